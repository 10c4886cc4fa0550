"""The vLLM engine behind the inference service: the only module that imports vLLM.

vLLM's AsyncLLM does continuous batching: every request is added to one running engine and
generated alongside the others. Weights are swapped in place with ``reload_weights`` (same
architecture, new tensors) followed by a prefix-cache reset, so no restart is needed.

With ``priority_scheduling`` on (the default) the engine runs vLLM's ``scheduling_policy="priority"``
and each request is added with its priority (services/inference/priority.py: users first, the
trainer's rollouts last): the waiting queue is ordered by (priority, arrival), and when the KV cache
runs out the running request with the highest (priority, arrival) is preempted first. The scheduler
is vLLM's own Python code, the same in the CPU and the CUDA builds.

With ``lora_adapters`` on, the engine also has vLLM's LoRA slots (``enable_lora``): adapter versions
are added and removed at run time (``add_adapter`` / ``remove_adapter``, services/inference/adapters.py
decides which) without touching the base weights, and each request names the adapter it runs with
(``generate(..., adapter=...)``; None: the base weights). vLLM keeps every added adapter in memory
(``max_cpu_loras`` = RLHF_INFERENCE_LORA_MAX_LOADED, never exceeded: adapters.py unloads first), so
an adapter's files are read once, when it is added.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from services.inference.config import InferenceConfig, lora_batch
from services.inference.domain import Sampling
from services.inference.worker_extension import (
    Signature,
    VerifiedWeightsWorker,
    WeightsRefused,
    signature_from_json,
    signature_to_json,
)
from shared.version_line import StoreFile

if TYPE_CHECKING:  # vLLM is imported when the engine starts
    from vllm.config.lora import MaxLoRARanks
    from vllm.config.model import ModelDType
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM


@dataclass(frozen=True)
class AdapterHandle:
    """An adapter loaded in the engine's LoRA slots: what a request names to run with it."""

    version: str
    """The policy version the adapter is (its answers carry it as policy_version)."""
    slot_id: int
    """vLLM's lora_int_id: unique per version, at least 1 (the version's number on its line)."""
    path: Path
    """The verified private copy the engine read it from."""


@dataclass(frozen=True)
class EngineOutput:
    """New tokens of one completion since its previous output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None


def configure_vllm_environment(cfg: InferenceConfig) -> None:
    """vLLM reads these from the environment of the engine process it spawns."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
    if cfg.cpu_omp_wait_policy:
        # Read by libgomp when the engine process (spawned on CPU) loads torch.
        os.environ["OMP_WAIT_POLICY"] = cfg.cpu_omp_wait_policy.upper()
    if cfg.worker_in_engine_process and cfg.tensor_parallel_size == 1:
        # AsyncLLM still runs its engine core in a process of its own; this only lets vLLM's CPU
        # platform keep the model worker in that process ("uni" executor) instead of a third one.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Our own /metrics replaces vLLM's periodic stats lines.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def lora_engine_args(cfg: InferenceConfig) -> dict[str, Any]:
    """vLLM's LoRA settings from the config: none unless lora_adapters is on; then LoRA slots for
    ``lora_batch(cfg)`` adapters in one batch, ``lora_max_loaded`` kept in memory (max_cpu_loras) and
    ranks up to ``lora_max_rank``."""
    if not cfg.lora_adapters:
        return {}
    return {
        "enable_lora": True,
        "max_loras": lora_batch(cfg),
        "max_cpu_loras": cfg.lora_max_loaded,
        "max_lora_rank": cast("MaxLoRARanks", cfg.lora_max_rank),  # one of them: problems() checks it
    }


def lora_request(adapter: AdapterHandle) -> LoRARequest:
    """vLLM's request object for a loaded adapter (named by its version, read from its private copy)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.version, lora_int_id=adapter.slot_id, lora_path=str(adapter.path))


class VllmEngine:
    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self._llm: AsyncLLM | None = None
        self._single_process = cfg.worker_in_engine_process and cfg.tensor_parallel_size == 1

    async def start(self, model_dir: Path) -> None:
        configure_vllm_environment(self.cfg)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_dir),
            tokenizer=str(model_dir),
            served_model_name=self.cfg.served_model_name,
            dtype=cast("ModelDType", self.cfg.dtype),  # one of them: InferenceConfig.problems() checks it
            max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs,
            seed=self.cfg.seed,
            # Never unpickle weights: only safetensors are loaded.
            load_format="safetensors",
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            distributed_executor_backend="uni" if self._single_process else None,
            enforce_eager=self.cfg.enforce_eager,
            scheduling_policy="priority" if self.cfg.priority_scheduling else "fcfs",
            disable_log_stats=True,
            # Full-weight swaps: the worker reads the store's files once, checks and loads them
            # (worker_extension.py) instead of vLLM reading a private copy.
            worker_extension_cls=f"{VerifiedWeightsWorker.__module__}.{VerifiedWeightsWorker.__qualname__}",
            **lora_engine_args(self.cfg),
        )
        self._llm = AsyncLLM.from_engine_args(args)

    @property
    def llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("engine not started")
        return self._llm

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: Sampling,
        priority: int = 0,
        adapter: AdapterHandle | None = None,
    ) -> AsyncIterator[list[EngineOutput]]:
        """Yield, per engine step, the new output of each completion that advanced. ``priority``:
        lower is scheduled earlier (ignored unless priority_scheduling is on). ``adapter``: run with
        this loaded adapter on the base weights (None: the base weights alone)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            # 0 = the sampled token's own log-probability only; under the raw policy distribution
            # (vLLM's default logprobs_mode), which is what PPO's ratio needs.
            logprobs=0 if sampling.logprobs else None,
            output_kind=RequestOutputKind.DELTA,
        )
        priority = priority if self.cfg.priority_scheduling else 0
        async for out in self.llm.generate(
            {"prompt_token_ids": prompt_token_ids},
            params,
            request_id,
            lora_request=lora_request(adapter) if adapter is not None else None,
            priority=priority,
        ):
            step = []
            for o in out.outputs:
                lps = None
                if sampling.logprobs and o.logprobs is not None:
                    # vLLM types a position of FlatLogprobs Optional (the first prompt position has
                    # none); every sampled position has its logprobs.
                    lps = [float(pos[tid].logprob) for tid, pos in zip(o.token_ids, o.logprobs)]  # type: ignore[index]
                step.append(EngineOutput(o.index, o.text, list(o.token_ids), lps, o.finish_reason))
            yield step

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def reload_weights(self, model_dir: Path, *, with_requests_running: bool = False) -> None:
        """Load new weights of the same architecture in place and drop cached prefixes.

        With requests running, the engine is paused between two steps (requests kept), and the
        running requests are preempted so that their KV cache is recomputed with the new weights
        rather than mixing old keys and values with new weights.
        """
        if with_requests_running:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
        try:
            await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
            if not await self.llm.reset_prefix_cache(reset_running_requests=with_requests_running):
                raise RuntimeError("vLLM could not reset its prefix cache after the reload")
        finally:
            if with_requests_running:
                await self.llm.resume_generation()

    async def stage_weights(self, token: str, files: Sequence[StoreFile]) -> Signature:
        """Have the worker read, check and parse a version's weight files from the store while the
        engine keeps generating (worker_extension.py); returns their tensor signature once they are
        all in memory. WeightsRefused ("corrupt") when a file is not what its manifest says."""
        described = [
            {"path": str(f.path), "hex": f.digest.hex, "bytes": f.digest.bytes, "algorithm": f.algorithm} for f in files
        ]
        await self.llm.collective_rpc("rlhf_stage", kwargs={"token": token, "files": described})
        delay = 0.005
        while True:
            statuses = await self.llm.collective_rpc("rlhf_staged", kwargs={"token": token})
            if all(s["done"] for s in statuses):
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        for status in statuses:
            if "error" in status:
                raise WeightsRefused(status["reason"], status["error"])
        return signature_from_json(statuses[0]["signature"])

    async def load_staged(
        self, token: str, expected: Signature, *, with_requests_running: bool = False
    ) -> dict[str, float]:
        """Load the staged weights in place (as ``reload_weights``: paused between two steps when
        requests run, their KV cache recomputed, prefixes dropped) if their tensors are exactly
        ``expected`` (the served weights'); WeightsRefused otherwise, the served weights untouched.
        Returns where the time went, in seconds: ``pause_s`` (waiting for the step in progress
        when requests run), ``load_s`` (vLLM's reload in the worker, the slowest worker), ``total_s``."""
        started = time.monotonic()
        if with_requests_running:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
        paused = time.monotonic()
        try:
            results = await self.llm.collective_rpc(
                "rlhf_load_staged", kwargs={"token": token, "expected": signature_to_json(expected)}
            )
            refused = [r for r in results if not r["loaded"]]
            if refused:
                raise WeightsRefused(refused[0]["reason"], refused[0]["error"])
            if not await self.llm.reset_prefix_cache(reset_running_requests=with_requests_running):
                raise RuntimeError("vLLM could not reset its prefix cache after the reload")
        finally:
            if with_requests_running:
                await self.llm.resume_generation()
        load_s = max(float(r["load_s"]) for r in results)
        return {"pause_s": paused - started, "load_s": load_s, "total_s": time.monotonic() - started}

    # --- LoRA adapters (lora_adapters on) ---------------------------------------------------------

    async def add_adapter(self, adapter: AdapterHandle) -> float:
        """Load an adapter's files into the engine's LoRA cache (the base weights are not touched;
        requests keep running: vLLM does it between two steps); returns the seconds the engine's
        other requests were held for it (VerifiedWeightsWorker.rlhf_add_lora). Raises when vLLM
        cannot load it or a worker does not list it afterwards."""
        results = await self.llm.collective_rpc(
            "rlhf_add_lora",
            kwargs={"name": adapter.version, "slot_id": adapter.slot_id, "path": str(adapter.path)},
        )
        # "added" False alone is no failure: an adapter with this slot id was already there (the
        # same version); every worker must list it afterwards either way.
        if not all(r["listed"] for r in results):
            raise RuntimeError(f"vLLM did not add adapter {adapter.version} (slot {adapter.slot_id})")
        return max(float(r["held_s"]) for r in results)

    async def remove_adapter(self, adapter: AdapterHandle) -> bool:
        """Unload an adapter (no request may still run with it); False when it was not loaded."""
        return await self.llm.remove_lora(adapter.slot_id)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
