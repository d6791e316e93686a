"""The bottom layer: what every stage shares and nothing else.

`vocab` (token ids), `errors` (the user-error base and `exit_on`), `files` (atomic writes, image
suffixes) and `options` (the `--device`/`--dtype`/`--model`/`--tokenizer` convention). It imports no other
package of this repository; `weights`, `tokenizer`, `sentences` and `lvm` build on it (docs/ARCHITECTURE.md).
"""
