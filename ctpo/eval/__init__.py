"""avg@k evaluation through the TIR agent loop (`python -m ctpo.eval`, see `ctpo/eval/__main__.py`).

    metrics   avg@k, unbiased pass@k, bootstrap CIs over problems, paired bootstrap, seed aggregation
              (numpy + pandas only: reports import it without torch)
    runner    benchmark loading, fixed seeded chunks of (problem, sample) pairs, resumable partial file
    backend   hf (CPU / one GPU) or vllm generation, weight hashes and versions for provenance
"""
