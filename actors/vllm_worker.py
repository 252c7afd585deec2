"""Methods mixed into every vLLM worker (`worker_extension_cls`), called by `collective_rpc`.

Imported inside vLLM's worker processes, never by the actor itself.

Why not plain `collective_rpc("reload_weights")`: on CPU, vLLM packs each linear layer's
weight for oneDNN after loading (`dispatch_cpu_unquantized_gemm`). A tied LM head shares its
weight with the embedding but has its own packed copy, and an in-place reload loads no
tensor for it (the checkpoint has no `lm_head.weight`), so it keeps multiplying by the *old*
embedding: measured here, log-probs off by ~1 nat after a reload of the tiny model. We pack
it again from the freshly loaded shared weight.
"""

from __future__ import annotations


class WeightReloadExtension:
    """`aha_reload_weights(weights_path)`: reload in place, then fix what reload misses."""

    def aha_reload_weights(self, weights_path: str) -> None:
        from vllm.platforms import current_platform

        self.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        tied = lm_head is not None and embed is not None and lm_head.weight is embed.weight
        if tied and current_platform.is_cpu():
            lm_head.quant_method.process_weights_after_loading(lm_head)
