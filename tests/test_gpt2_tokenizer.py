"""The vendored GPT-2 tokenizer gives GPT-2's own token ids offline."""

import pytest

import plateau_jax as pj
from plateau_jax import testing


def test_known_gpt2_token_ids():
    tok = pj.gpt2_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok) == 50257 and tok.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert (ids(" big"), ids(" in"), ids(" large")) == ([1263], [287], [1588])
    assert ids("The house was") == [464, 2156, 373]
    assert ids("Hello world") == [15496, 995]
    assert tok.decode(ids(" activation plateaus")) == " activation plateaus"


@pytest.mark.slow
def test_study_shaped_model_offline():
    cfg = pj.ModelConfig.preset("gpt2", n_layer=1)  # GPT-2's vocabulary and width, one block
    model = testing.make_checkpoint(None, cfg, tokenizer=pj.gpt2_tokenizer())
    logits, _ = pj.forward(model, model.to_tokens("The house was big"))
    assert logits.shape == (1, 4, 50257)
