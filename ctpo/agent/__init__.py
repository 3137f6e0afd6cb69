"""Tool-integrated reasoning (TIR) rollouts: chat template, generators, the multi-turn agent loop.

    render_prompt(question, template)                     configs/tir/<template>.yaml
    run_episodes(generator, tokenizer, questions, cfg: RolloutConfig, params, sandbox=None) -> [Episode]
    HFGenerator(model, tokenizer)  /  VLLMGenerator(model_path, ...)   (vllm imported lazily)
    load_policy(path_or_id, device, dtype) -> (model, tokenizer)

The turn rule (code extraction, observations, void turns, infra retries) is `ctpo.agent.turns`,
shared with the verl agent loop (`ctpo.agent.verl_loop`, name `ctpo_tir`) and tool
(`ctpo.agent.verl_tool.PythonSandboxTool`). Importing this package does not import torch or verl.
"""
from ctpo.agent.generation import GenOutput, Generator, HFGenerator, SamplingParams
from ctpo.agent.loop import Episode, run_episodes
from ctpo.agent.policy import load_policy
from ctpo.agent.template import load_template, render_prompt, template_hash
from ctpo.agent.turns import FINISH_REASONS, extract_code, format_observation
from ctpo.agent.vllm_generator import VLLMGenerator

__all__ = [
    "Episode", "FINISH_REASONS", "GenOutput", "Generator", "HFGenerator", "SamplingParams", "VLLMGenerator",
    "extract_code", "format_observation", "load_policy", "load_template", "render_prompt", "run_episodes",
    "template_hash",
]
