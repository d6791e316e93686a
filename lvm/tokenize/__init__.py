"""Turn images, img2dataset tar shards and videos into token shards (`python -m lvm.tokenize`).

Modules, in the order data flows through them:
`sources` (inputs -> deterministic output units), `decode` (unit -> decoded pictures or
skip records), `derive` (pure pixel functions: gray, masked; label colours come from `lvm.palette`),
`writer` (atomic output shard + report, resume check), `pipeline` (DataLoader workers,
batched encoding, ranks, progress). The format written is documented in docs/FORMATS.md.
"""


from common.errors import UserError


class TokenizeError(UserError):
    """A problem with the user's inputs or options, printed as one line by the CLI (exit 2)."""


__all__ = ["TokenizeError"]
