"""The one exception of the sentences package.

Raised for bad input (a malformed spec, token shards from mixed tokenizers, ids out of range). The CLI prints
it (a ``common.errors.UserError``) as ``error: <file>: <problem>`` and exits with status 2, so every message names the file and the problem on
one line instead of surfacing as a traceback.
"""

from common.errors import UserError


class SentenceError(UserError, ValueError):
    """Bad input to the sentence builder or the packed stream; the message is one line naming the file."""
