"""The language-model layer under the stages: model references and loading (:mod:`.models`), value / score heads,
LoRA and precision (:mod:`.policy_models`), the sampling loop (:mod:`.generation`), log-probabilities without
(B, T, V) temporaries (:mod:`.logprobs`), the shared prompt prefix (:mod:`.prefix`) and sequence helpers
(:mod:`.sequences`). It imports only :mod:`rlhf_lib.core`.
"""

__all__ = ["generation", "logprobs", "models", "policy_models", "prefix", "sequences"]
