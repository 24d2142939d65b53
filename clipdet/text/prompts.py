"""Prompt embedding for heads that score images against text prompts (the zeroshot head)."""

from __future__ import annotations

from ..errors import UsageError

#: CLIP's trained temperature (the logit scale is clamped at 100 in training; OpenAI's and most LAION
#: models reach it): zero-shot p_fake = sigmoid(ZERO_SHOT_SCALE x (cos_fake - cos_real)), uncalibrated.
ZERO_SHOT_SCALE = 100.0


def embed_prompts(model, text, head: str = "zeroshot") -> None:
    """Embed `model`'s prompt sets with `text` (a `TextEmbedder`) and hand them to the head.

    The head's `prompts` parameter is replaced by the prompt text itself (not a file name), so the
    detector file records exactly which prompts it scores with."""
    if text is None:
        raise UsageError(f"head {head} needs the backbone's text tower to embed its prompts "
                         "(clipdet fit and bench provide it)")
    sets = model.prompt_sets()
    model.set_params(prompts=sets)
    model.set_prompt_embeddings(text.embed(sets["real"]), text.embed(sets["fake"]), ZERO_SHOT_SCALE)
