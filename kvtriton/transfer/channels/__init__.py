"""Data channels (see :mod:`kvtriton.transfer.channels.base`)."""

from kvtriton.transfer.channels.base import ChannelHost, DataChannel

__all__ = ["ChannelHost", "DataChannel"]
