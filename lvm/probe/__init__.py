"""Representation probe: how well small classifiers read an LVM's frozen features, layer by layer.

    python -m lvm.probe --model M --tokenizer T --train DIR --val DIR --out OUT [--layers 0.25,0.5,0.75,1.0]

The protocol of Toto and AIM: images are tokenized, the LVM reads one image's tokens (after BOS,
as at the start of a sentence), the hidden states at a few depths are cached, and two probes are
trained on them per depth: attentive pooling (a learned query cross-attending over the tokens, then
a linear head) and a linear head on the mean-pooled tokens as the baseline. See docs/inference.md.

- `data`: labelled images (class folders or webdataset shards) -> tokens, through the tokenize pipeline;
- `features`: hidden states at the requested depths, computed once and cached on disk;
- `heads`: the two probes and their training (AdamW, early stopping on a split of train);
- `report`: report.json, report.md and the accuracy-against-depth plot.
"""

from common.errors import UserError


class ProbeError(UserError):
    """Unusable probe input or option: `ProbeError(path or option, problem)`."""
