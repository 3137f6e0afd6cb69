"""The paper config's first prompt and first tool turn next to the release's, token by token.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/protocol_compare.py                  # offline Qwen3-style tokenizer
    PYTHONPATH=$PWD .venv/bin/python benchmarks/protocol_compare.py --tokenizer Qwen/Qwen3-4B   # the real one

ours     rollout.protocol release on verl 0.9.1: `ReleaseToolAgentLoop` (verl's ToolAgentLoop, Continuous Token
         builder for model_type qwen3), the `hermes_fallback` parser, `CodeInterpreterTool` on ctpo's sandbox.
release  the authors' fork (verl 0.8-dev), re-enacted from its source: prompt = apply_chat_template(system prompt +
         user, tools), the generated ids appended as they are, the tool turn = apply_chat_template([tool message],
         add_generation_prompt) with the template's system prefix removed (none for Qwen3), appended directly.
tir      the project's former protocol (rollout.protocol ctpo_tir, configs/tir/qwen3_tir.yaml), for reference.

The same scripted first assistant turn (a fenced python block, as the release's system prompt asks) is fed to
each; its code runs in ctpo's sandbox. Prints a markdown report: lengths, first differing token, and the token
table around each difference.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$"  # AIME 2025 I.1
TURN = ("We need $b+7 \\mid 9b+7$.\n```python\nprint(sum(b for b in range(10, 1000) if (9*b+7) % (b+7) == 0))\n```"
        "<|im_end|>")


def load_tokenizer(name: str | None):
    if name is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from qwen3_tokenizer import qwen3_style_tokenizer

        return qwen3_style_tokenizer(), "offline Qwen3-style tokenizer (tests/qwen3_tokenizer.py: Qwen3 chat template, byte-level ids)"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name), name


def ours(tok, question: str, turn_ids: list[int], tool):
    """(prompt_ids, first tool turn ids, tool text) through the paper config's verl path."""
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.workers.rollout.replica import TokenOutput

    from ctpo.agent.protocols import release_system_prompt
    from ctpo.agent.release_episodes import trainer_config
    from ctpo.agent.release_protocol import ReleaseToolAgentLoop
    from ctpo.config import load_experiment, load_run_config, resolve_run

    cfg = load_run_config(resolve_run(load_experiment(ROOT / "configs/experiments/paper.yaml"), "qwen3_4b_ctpo", 0))
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    class Server:
        def __init__(self):
            self.calls = 0

        async def generate(self, request_id, *, prompt_ids, sampling_params, **kw):
            self.calls += 1
            ids = turn_ids if self.calls == 1 else [eos]
            return TokenOutput(token_ids=list(ids), log_probs=[0.0] * len(ids))

    async def main():
        loop = ReleaseToolAgentLoop(
            trainer_config=DictConfigWrap(trainer_config(cfg.rollout)), server_manager=Server(), tokenizer=tok,
            processor=None, dataset_cls=None, hf_model_type="qwen3", tools=ToolListWrap([tool]),
            data_config=DictConfigWrap(OmegaConf.create({"apply_chat_template_kwargs": {"enable_thinking": cfg.rollout.enable_thinking}})),
            system_prompt=release_system_prompt(),
        )
        return await loop.run({}, raw_prompt=[{"role": "user", "content": question}])

    out = asyncio.run(main())
    resp, mask = out.response_ids, out.response_mask
    first0 = mask.index(0)
    end0 = first0 + mask[first0:].index(1) if 1 in mask[first0:] else len(mask)
    assert resp[:first0] == turn_ids
    return list(out.prompt_ids), list(resp[first0:end0])


def release(tok, question: str, turn_ids: list[int], tool_text: str, schemas: list[dict]):
    """The release fork's token stream (its tool_agent_loop.py + verl 0.8-dev apply_chat_template)."""
    from verl.utils.tokenizer.chat_template import initialize_system_prompt

    from ctpo.agent.protocols import release_system_prompt

    def ids(x):
        return list(x["input_ids"]) if hasattr(x, "keys") else list(x)

    kw = {"enable_thinking": False}
    messages = [{"role": "system", "content": release_system_prompt()}, {"role": "user", "content": question}]
    prompt = ids(tok.apply_chat_template(messages, tools=schemas, add_generation_prompt=True, tokenize=True, **kw))
    sys_ids = initialize_system_prompt(tok, **kw)
    tool_ids = ids(tok.apply_chat_template([{"role": "tool", "content": tool_text}], add_generation_prompt=True,
                                           tokenize=True, **kw))[len(sys_ids):]
    return prompt, tool_ids


def tir(tok, question: str):
    from ctpo.agent.template import load_template, render_prompt

    t = load_template("qwen3_tir")
    return tok.encode(render_prompt(question, "qwen3_tir"), add_special_tokens=False), t


def table(tok, a: list[int], b: list[int], name_a: str, name_b: str, context: int = 3) -> list[str]:
    """Markdown rows for every non-equal opcode, aligned, with `context` equal tokens either side."""
    rows = []
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        rows += [f"\n{tag}: {name_a}[{i1}:{i2}] vs {name_b}[{j1}:{j2}]\n",
                 f"| {name_a} pos | {name_a} token | {name_b} pos | {name_b} token |", "|---|---|---|---|"]
        pairs = [(i1 - k, j1 - k) for k in range(min(context, i1, j1), 0, -1)]
        pairs += [(i1 + k if i1 + k < i2 else None, j1 + k if j1 + k < j2 else None)
                  for k in range(max(i2 - i1, j2 - j1))]
        pairs += [(i2 + k, j2 + k) for k in range(context) if i2 + k < len(a) and j2 + k < len(b)]
        for x, y in pairs:
            cell_a = (str(x), repr(tok.decode([a[x]]))) if x is not None else ("", "")
            cell_b = (str(y), repr(tok.decode([b[y]]))) if y is not None else ("", "")
            rows.append(f"| {cell_a[0]} | {cell_a[1]} | {cell_b[0]} | {cell_b[1]} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=None, help="a Qwen3 tokenizer path or hub id (default: the offline fixture)")
    p.add_argument("--question", default=QUESTION)
    a = p.parse_args(argv)
    tok, tok_name = load_tokenizer(a.tokenizer)

    from verl.tools.schemas import OpenAIFunctionToolSchema

    from ctpo.agent.release_protocol import CodeInterpreterTool, load_tool_config
    from ctpo.sandbox import SandboxLimits, SandboxPool

    turn_ids = tok.encode(TURN, add_special_tokens=False)
    cfg, schema = load_tool_config()
    with SandboxPool(1, SandboxLimits(timeout_s=cfg["default_timeout_s"])) as pool:
        with contextlib.redirect_stdout(io.StringIO()):  # verl's BaseTool prints its schema
            tool = CodeInterpreterTool(cfg, OpenAIFunctionToolSchema.model_validate(schema), sandbox=pool)
        o_prompt, o_tool = ours(tok, a.question, turn_ids, tool)
        res = asyncio.run(tool.execute("x", {"code": TURN.split("```python\n")[1].split("\n```")[0], "timeout": 30}))
    tool_text = res[0].text
    schemas = [tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True)]
    r_prompt, r_tool = release(tok, a.question, turn_ids, tool_text, schemas)
    t_prompt, t = tir(tok, a.question)
    t_obs = tok.encode(t.observation.replace("{output}", tool_text), add_special_tokens=False)

    out = [f"# First prompt and first tool turn: paper config vs the release\n\ntokenizer: {tok_name}\n",
           f"question: {a.question!r}\n\nfirst assistant turn (scripted, {len(turn_ids)} tokens): {TURN!r}\n",
           f"tool output (ctpo sandbox): {tool_text!r}\n",
           "| stream | ours (paper config, verl 0.9.1) | release (re-enacted) | former ctpo_tir |",
           "|---|---|---|---|",
           f"| first prompt tokens | {len(o_prompt)} | {len(r_prompt)} | {len(t_prompt)} |",
           f"| first prompt identical to the release's | {o_prompt == r_prompt} | - | {t_prompt == r_prompt} |",
           f"| first tool turn tokens (mask 0) | {len(o_tool)} | {len(r_tool)} | {len(t_obs)} |",
           f"| first tool turn identical to the release's | {o_tool == r_tool} | - | {t_obs == r_tool} |",
           f"\nours, first tool turn: {tok.decode(o_tool)!r}\n\nrelease, first tool turn: {tok.decode(r_tool)!r}\n"]
    out.append("## Differences, ours vs release: first prompt")
    out += table(tok, o_prompt, r_prompt, "ours", "release") or ["none: identical token for token"]
    out.append("\n## Differences, ours vs release: first tool turn")
    out += table(tok, o_tool, r_tool, "ours", "release") or ["none: identical token for token"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
