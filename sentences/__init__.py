"""Visual sentences: token shards -> sentence shards (``python -m sentences.build``) -> packed training batches.

``sentences.stream.PackedStream`` is the training stream; ``sentences.kinds`` has one builder per kind of
sentence; docs/sentences.md is the user guide and docs/FORMATS.md the shard formats.
"""

from common.errors import interrupt_quietly_when_started_as_a_command

interrupt_quietly_when_started_as_a_command()  # first, before torch loads
