"""tinyshakespeare as federated data: a character vocabulary, per-client shards and a held-out validation
split.

The text is a run of speeches ("SPEAKER:\\nlines", separated by blank lines). Speeches are the unit of every
split, so no client ever sees half a speech. A fixed fraction of speeches, drawn with the seed, is held out
for validation before the rest is dealt to clients, so every split is validated on the same text and settings
are comparable.

Splits:
- ``iid``: speeches shuffled and dealt round-robin; every client sees every speaker and play.
- ``speaker``: each speaker's speeches all go to one client (speakers assigned largest-first to the client
  with the fewest characters), so clients differ in voice and vocabulary.
- ``play``: the text cut into equal contiguous runs; the file is the plays one after another, so each client
  holds different plays.

Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_PATH = Path(__file__).parent / "data" / "tinyshakespeare.txt"
SPLITS = ("iid", "speaker", "play")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Vocab:
    chars: str

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


@dataclass(frozen=True)
class Corpus:
    vocab: Vocab
    clients: list[torch.Tensor]  # token ids of each client's shard
    val: torch.Tensor  # token ids of the held-out speeches

    @property
    def pooled(self) -> torch.Tensor:
        """Every client's training text together: what centralized training would see."""
        return torch.cat(self.clients)


def load_text(path: Path = TEXT_PATH) -> str:
    return path.read_text(encoding="utf-8")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech text with its heading) for every speech, in order."""
    out = []
    for part in text.split("\n\n"):
        part = part.strip("\n")
        if part:
            out.append((part.split("\n", 1)[0].rstrip(":"), part))
    return out


def build_corpus(num_clients: int, split: str, seed: int, val_fraction: float = 0.1) -> Corpus:
    """Shards for ``num_clients`` clients plus the validation text, deterministic given ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    text = load_text()
    vocab = Vocab("".join(sorted(set(text))))
    all_speeches = speeches(text)
    rng = random.Random(seed)
    held_out = set(rng.sample(range(len(all_speeches)), int(len(all_speeches) * val_fraction)))
    train = [s for i, s in enumerate(all_speeches) if i not in held_out]
    val = [s[1] for i, s in enumerate(all_speeches) if i in held_out]
    shards = {"iid": _split_iid, "speaker": _split_by_speaker, "play": _split_contiguous}[split](
        train, num_clients, rng
    )
    return Corpus(
        vocab, [vocab.encode("\n\n".join(shard)) for shard in shards], vocab.encode("\n\n".join(val))
    )


def _split_iid(train: list[tuple[str, str]], n: int, rng: random.Random) -> list[list[str]]:
    order = list(range(len(train)))
    rng.shuffle(order)
    return [[train[i][1] for i in order[k::n]] for k in range(n)]


def _split_by_speaker(train: list[tuple[str, str]], n: int, rng: random.Random) -> list[list[str]]:
    sizes: dict[str, int] = {}
    for speaker, body in train:
        sizes[speaker] = sizes.get(speaker, 0) + len(body)
    load = [0] * n
    owner: dict[str, int] = {}
    for speaker in sorted(sizes, key=lambda s: (-sizes[s], s)):
        k = min(range(n), key=lambda i: (load[i], i))
        owner[speaker] = k
        load[k] += sizes[speaker]
    shards: list[list[str]] = [[] for _ in range(n)]
    for speaker, body in train:
        shards[owner[speaker]].append(body)
    return shards


def _split_contiguous(train: list[tuple[str, str]], n: int, rng: random.Random) -> list[list[str]]:
    total = sum(len(body) for _, body in train)
    shards: list[list[str]] = [[] for _ in range(n)]
    seen = 0
    for _, body in train:
        shards[min(seen * n // total, n - 1)].append(body)
        seen += len(body)
    return shards


def sample_batches(
    tokens: torch.Tensor, count: int, batch_size: int, block_size: int, generator: torch.Generator
) -> list[Batch]:
    """``count`` batches of random windows: inputs and the same windows shifted by one character."""
    starts = torch.randint(len(tokens) - block_size - 1, (count, batch_size), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = tokens[starts.unsqueeze(-1) + offsets]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def validation_batches(
    corpus: Corpus, count: int, batch_size: int, block_size: int, seed: int
) -> list[Batch]:
    """A fixed set of validation batches: the same text scores every model of a run."""
    return sample_batches(corpus.val, count, batch_size, block_size, torch.Generator().manual_seed(seed))
