"""LVM: Large Vision Models trained on visual sentences, pixels only."""

from common.errors import interrupt_quietly_when_started_as_a_command

interrupt_quietly_when_started_as_a_command()  # first, before torch loads
