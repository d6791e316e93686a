"""Token ids shared by every stage of the pipeline.

VQ codes are used as token ids directly (no offset), so a token shard, a visual
sentence and the released LVM checkpoints all speak the same ids. Special tokens
live above the codebook; the vocabulary reserves 100 of them, as the released
LVM-7B does (8192 + 100 = 8292).
"""

CODEBOOK_SIZE = 8192
NUM_RESERVED = 100
VOCAB_SIZE = CODEBOOK_SIZE + NUM_RESERVED  # 8292

BOS_ID = CODEBOOK_SIZE  # 8192: opens a visual sentence
EOS_ID = CODEBOOK_SIZE + 1  # 8193: closes a visual sentence
PAD_ID = CODEBOOK_SIZE + 2  # 8194: the pad id exported configs declare (prompts are never padded), never a training target

TOKENS_PER_IMAGE = 256  # 16x16 codes for a 256x256 image at f=16
CONTEXT_LENGTH = 4096  # 16 images per training window

