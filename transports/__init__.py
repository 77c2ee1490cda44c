"""Installed as ``pccl.transports``: control channel, data links, framing."""
