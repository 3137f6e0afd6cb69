"""vLLM's worker extension for verl's vLLM rollout on vLLM's CPU build (`train.verl_cpu_rollout: vllm`).

verl syncs the trainer's weights into vLLM in place (`vLLMColocateWorkerExtension.update_weights_from_ipc`:
each parameter's `weight_loader` copies into `param.data`). On CPU, vLLM 0.24 prepacks linear layers'
weights for oneDNN after loading and leaves `layer.weight` empty, so that copy fails ("Attempted to load
weight ... into parameter (torch.Size([0]))"). Importing this module (vLLM does so in each worker process
before the model is built, as it resolves `worker_extension_cls`) turns the prepacking off: the weights stay
plain parameters that verl's sync updates, and vLLM's CPU linear falls back to torch's matmul.
"""
from __future__ import annotations

from vllm import _custom_ops

from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

_custom_ops._supports_onednn = False  # vLLM's CPU linear layers check this when they are built


class CPUColocateWorkerExtension(vLLMColocateWorkerExtension):
    """verl's colocated worker extension, unchanged; its module's import is the point (see above)."""
