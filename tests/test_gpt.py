"""The demo model and its data: sizes, determinism of the splits, and that training lowers validation loss."""

from __future__ import annotations

import torch

from workers import gpt, shakespeare

torch.set_num_threads(1)


def test_default_model_has_a_few_million_parameters_and_no_tied_or_bias_tensors() -> None:
    model = gpt.GPT(gpt.GPTConfig(65))
    assert gpt.num_parameters(model) == 1_261_280
    state = model.state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)  # no tensor under two names
    assert not any(name.endswith("bias") for name in state)
    assert model(torch.zeros(2, 64, dtype=torch.long)).shape == (2, 64, 65)


def test_splits_are_deterministic_disjoint_and_share_the_validation_text() -> None:
    iid = shakespeare.build_corpus(4, "iid", seed=0)
    play = shakespeare.build_corpus(4, "play", seed=0)
    again = shakespeare.build_corpus(4, "play", seed=0)
    assert iid.vocab.size == 65
    assert all(torch.equal(a, b) for a, b in zip(play.clients, again.clients, strict=True))
    assert torch.equal(iid.val, play.val)  # every split is scored on the same held-out speeches
    assert not torch.equal(shakespeare.build_corpus(4, "play", seed=1).val, play.val)
    speeches = shakespeare.speeches(shakespeare.load_text())
    # every speech is in exactly one shard or in the validation text ("\n\n" joins the speeches of each)
    parts = [*play.clients, play.val]
    assert sum(len(p) + 2 for p in parts) == sum(len(s) + 2 for _, s in speeches)
    assert abs(play.val.numel() / sum(len(p) for p in parts) - 0.1) < 0.01
    sizes = [len(c) for c in play.clients]
    assert max(sizes) / min(sizes) < 1.05  # byte-balanced shards
    # the play split is contiguous: client 0 begins with the first speech of the file unless it was held out
    first_decoded = play.vocab.decode(play.clients[0][:14])
    assert first_decoded in (speeches[0][1][:14], speeches[1][1][:14])


def test_speaker_split_gives_each_speaker_to_one_client() -> None:
    corpus = shakespeare.build_corpus(4, "speaker", seed=0)
    owners: dict[str, set[int]] = {}
    for k, tokens in enumerate(corpus.clients):
        for _, speech in shakespeare.speeches(corpus.vocab.decode(tokens)):
            owners.setdefault(speech.split("\n", 1)[0], set()).add(k)
    assert len(owners) == 299
    assert all(len(clients) == 1 for clients in owners.values())


def test_a_few_steps_of_training_lower_the_validation_loss() -> None:
    corpus = shakespeare.build_corpus(1, "iid", seed=0)
    val = shakespeare.validation_batches(corpus, 2, 32, 32, seed=0)
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(corpus.vocab.size, block_size=32, n_layer=1, n_head=2, n_embd=64))
    before = gpt.evaluate(model, val)
    batches = shakespeare.sample_batches(corpus.clients[0], 40, 16, 32, torch.Generator().manual_seed(0))
    train_loss = gpt.train_steps(model, gpt.make_optimizer(model, 1e-2), batches)
    after = gpt.evaluate(model, val)
    assert abs(before - 4.17) < 0.05  # ln(65): the untrained model guesses uniformly
    assert after < 3.0
    assert train_loss < before
