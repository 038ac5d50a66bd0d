"""Codecs: tensor slices <-> compact payloads; pure torch functions that know nothing of brokers."""

from __future__ import annotations

from fedq.codecs.base import Codec
from fedq.codecs.feedback import EncodedErrorFeedback, ErrorFeedback
from fedq.codecs.policy import choose_codec
from fedq.codecs.registry import CODECS, codec_from_header, get_codec

__all__ = [
    "CODECS",
    "Codec",
    "EncodedErrorFeedback",
    "ErrorFeedback",
    "choose_codec",
    "codec_from_header",
    "get_codec",
]
