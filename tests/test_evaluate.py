"""`lvm.evaluate` numbers on a tiny model equal a direct computation; the CLI writes its report and plot."""

import json
import math
from unittest.mock import patch

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from common.vocab import BOS_ID, CODEBOOK_SIZE, EOS_ID
from lvm import evaluate as evaluate_module
from lvm.evaluate import (
    Sentence,
    context_gain_by_token,
    main,
    pairs_depth,
    parse_args,
    perplexity_by_kind,
    perplexity_vs_context,
    perplexity_vs_pairs,
    pixel_metrics,
    read_sentences,
    run,
    target_nlls,
    unigram_perplexity,
)
from lvm.metrics import perplexities
from lvm.model import LVM, LVMConfig

T = 16  # tokens per image of the tiny tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # 112 = BOS + 6 context frames + all of the target but its last token, which is never an input: fits 6
    return LVM(LVMConfig(dim=64, mlp_dim=96, n_layers=2, n_heads=4, max_seq_len=112)).eval()


@pytest.fixture(scope="module")
def no_bos_model(model):
    """As the released LVM-7B: no BOS, so every position is one earlier than with one."""
    torch.manual_seed(1)
    return LVM(LVMConfig(**{**model.cfg.to_dict(), "bos_id": None})).eval()


def sentence(n_images: int, g: torch.Generator) -> np.ndarray:
    images = torch.randint(0, CODEBOOK_SIZE, (n_images * T,), generator=g)
    return np.concatenate([[BOS_ID], images.numpy(), [EOS_ID]]).astype(np.uint16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards: 3 video sentences of 8 frames, 2 pairs sentences of 4 images, and 3 broken items."""
    out = tmp_path_factory.mktemp("sentences")
    g = torch.Generator().manual_seed(0)
    with wds.TarWriter(str(out / "sentences-000000.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"v{i}", "tokens.npy": sentence(8, g), "json": {"kind": "video"}})
        tar.write({"__key__": "short", "tokens.npy": sentence(1, g), "json": {"kind": "video"}})
        tar.write({"__key__": "ragged", "tokens.npy": sentence(2, g)[:-3], "json": {"kind": "pairs"}})
    with wds.TarWriter(str(out / "sentences-000001.tar")) as tar:
        for i in range(2):
            tar.write({"__key__": f"p{i}", "tokens.npy": sentence(4, g), "json": {"kind": "pairs"}})
        tar.write({"__key__": "nojson", "tokens.npy": sentence(2, g)})
    return out


@pytest.fixture(scope="module")
def sentences(shards):
    return read_sentences(sorted(shards.glob("*.tar")), T)


@torch.no_grad()
def direct_token_nlls(model: LVM, images: torch.Tensor) -> torch.Tensor:
    """NLL [T] of each token of the last image given the others, written out by hand."""
    tokens = torch.cat([torch.tensor([BOS_ID] if model.cfg.bos_id is not None else []).long(), images.flatten()])[None]
    logp = torch.log_softmax(model(tokens[:, :-1])[0].double(), -1)  # causal: the last token predicts nothing scored
    targets = tokens[0, -T:]
    return -logp[-T:].gather(1, targets[:, None])[:, 0]


def direct_nll(model: LVM, images: torch.Tensor) -> float:
    return direct_token_nlls(model, images).mean().item()


def test_reading_skips_and_counts_broken_items(sentences):
    found, skipped = sentences
    assert [s.key for s in found] == ["v0", "v1", "v2", "p0", "p1"]
    assert [s.kind for s in found] == ["video"] * 3 + ["pairs"] * 2
    assert found[0].images.shape == (8, T)
    assert found[0].images.dtype == torch.int16  # held as 2-byte codes: int64 took four times the host memory
    assert skipped == {"fewer than 2 images": 1, f"not [BOS, k x {T} tokens, EOS]": 1, "missing tokens.npy or json": 1}


@pytest.mark.parametrize("which", ["model", "no_bos_model"])
def test_perplexity_matches_direct_computation(request, which, sentences):
    model = request.getfixturevalue(which)
    found, _ = sentences
    # video sentences have 8 images but 6 context frames fit: the last 7 images are used.
    nlls = [direct_nll(model, s.images[-7:]) for s in found[:3]] + [direct_nll(model, s.images) for s in found[3:]]
    expected = torch.tensor(nlls, dtype=torch.float64)
    torch.testing.assert_close(target_nlls(model, found, batch_size=2), expected, rtol=1e-5, atol=1e-5)
    report = perplexity_by_kind(model, found, batch_size=2)
    assert report["all"]["count"] == 5 and report["video"]["count"] == 3 and report["pairs"]["count"] == 2
    assert report["all"]["mean_perplexity"] == pytest.approx(np.mean(np.exp(nlls)))
    assert report["all"]["perplexity_of_mean_nll"] == pytest.approx(math.exp(np.mean(nlls)))
    assert report["pairs"]["mean_perplexity"] == pytest.approx(np.mean(np.exp(nlls[3:])))


def test_perplexities_of_a_broken_model_are_inf_not_an_error():
    """Past ~709 nats per token exp overflows a float: the report says inf (math.exp raised OverflowError)."""
    summary = perplexities(torch.tensor([800.0, 900.0]))
    assert summary["mean_perplexity"] == math.inf and summary["perplexity_of_mean_nll"] == math.inf
    assert summary["mean_nll"] == 850.0 and summary["count"] == 2


@pytest.mark.parametrize("which", ["model", "no_bos_model"])
def test_perplexity_vs_context_frames(request, which, sentences):
    model = request.getfixturevalue(which)
    bos = model.cfg.bos_id is not None
    video = sentences[0][:3]
    curve = perplexity_vs_context(model, video, batch_size=3)
    assert list(curve) == [0, 1, 2, 3, 4, 5, 6][1 - bos :]  # from no context (BOS alone) to what fits, not 15
    for k in (0, 1, 4)[1 - bos :]:
        expected = [direct_nll(model, s.images[-1 - k :]) for s in video]
        assert curve[k]["perplexity_of_mean_nll"] == pytest.approx(math.exp(np.mean(expected)))
    assert list(perplexity_vs_context(model, video, max_frames=3)) == [0, 1, 2, 3][1 - bos :]


def test_context_gain_splits_tokens_by_whether_their_code_stays(model):
    """NLL per token with k frames, split by whether the last frame keeps the previous frame's code at that place."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, CODEBOOK_SIZE, (3, 8, T), generator=g)
    images[:, -1, : T // 4] = images[:, -2, : T // 4]  # a quarter of the places keep their code
    video = [Sentence(f"v{i}", "video", im) for i, im in enumerate(images)]
    gain = context_gain_by_token(model, video, contexts=(1, 4, 99), batch_size=2)
    stays = images[:, -1] == images[:, -2]
    assert stays.sum() == 3 * T // 4 and gain["stay_fraction"] == pytest.approx(0.25)
    assert list(gain["nll"]) == [1, 4, 6]  # 99 frames asked, 6 fit
    for k in (1, 6):
        nll = torch.stack([direct_token_nlls(model, im[-1 - k :]) for im in images])
        assert gain["nll"][k]["stay"] == pytest.approx(nll[stays].mean().item(), rel=1e-5)
    # lvm.evaluate scores each context length once: the curve's per-token NLLs serve the split, and give its figures
    scored = {}
    curve = perplexity_vs_context(model, video, batch_size=2, scores=scored)
    assert sorted({k for _, k in scored}) == list(curve) == [0, 1, 2, 3, 4, 5, 6] and len(scored) == 3 * 7
    with patch.object(model, "forward", side_effect=AssertionError("scored again")):
        assert context_gain_by_token(model, video, contexts=(1, 4, 99), scores=scored) == gain
        assert gain["nll"][k]["change"] == pytest.approx(nll[~stays].mean().item(), rel=1e-5)
        assert gain["nll"][k]["all"] == pytest.approx(nll.mean().item(), rel=1e-5)
    still = [Sentence("s", "video", torch.cat([images[0, :7], images[0, 6:7]]))]  # the last frame repeats
    assert context_gain_by_token(model, still)["nll"][1]["change"] is None


def test_no_context_row_needs_bos(no_bos_model, sentences):
    """Without BOS (the released LVM) an image's first token has nothing to be predicted from: start at 1."""
    no_bos = no_bos_model
    assert list(perplexity_vs_context(no_bos, sentences[0][:3], max_frames=2)) == [1, 2]
    with pytest.raises(ValueError, match="num_context 0 scores the frame after BOS alone, and this model has no BOS"):
        target_nlls(no_bos, sentences[0][:3], num_context=0)


def test_context_curve_stops_at_the_frames_the_sentences_have(model):
    """4-frame clips give 0..3 context frames, though 6 would fit the model: no row for a context never measured."""
    g = torch.Generator().manual_seed(2)
    clips = [Sentence(f"v{i}", "video", torch.randint(0, CODEBOOK_SIZE, (4, T), generator=g)) for i in range(2)]
    assert list(perplexity_vs_context(model, clips)) == [0, 1, 2, 3]


def test_perplexity_vs_example_pairs(model):
    """The answer's perplexity given the query and n example pairs: n = 0 is [query, answer] after BOS."""
    g = torch.Generator().manual_seed(1)
    pairs = [Sentence(f"p{i}", "colorization", torch.randint(0, CODEBOOK_SIZE, (6, T), generator=g)) for i in range(2)]
    curve = perplexity_vs_pairs(model, pairs, batch_size=2)
    assert list(curve) == [0, 1, 2]  # 3 pairs per sentence: up to 2 examples before the query
    for n in (0, 2):
        expected = [direct_nll(model, s.images[-2 - 2 * n :]) for s in pairs]
        assert curve[n]["perplexity_of_mean_nll"] == pytest.approx(math.exp(np.mean(expected)))
    long = [Sentence("p", "inpainting", torch.randint(0, CODEBOOK_SIZE, (16, T), generator=g))]
    assert list(perplexity_vs_pairs(model, long)) == [0, 1, 2]  # 6 context images fit: 2 pairs and the query


def test_a_short_leftover_sentence_does_not_cut_the_analogy_curve(model):
    """A pass of a pairs source ends with a shorter sentence; the curve came from the shortest one, so a 1-pair
    leftover cut it to n = 0 for the whole kind (review 62 #1). It now spans what most sentences hold, on those."""
    g = torch.Generator().manual_seed(2)
    found = [Sentence(f"p{i}", "inpainting", torch.randint(0, CODEBOOK_SIZE, (2 * n, T), generator=g))
             for i, n in enumerate([1, 3, 3, 3])]
    assert pairs_depth(model, found) == 2  # 6 context images fit: 2 pairs and the query
    curve = perplexity_vs_pairs(model, found)
    assert list(curve) == [0, 1, 2] and all(point["count"] == 3 for point in curve.values())
    expected = [direct_nll(model, s.images) for s in found[1:]]  # n = 2: the whole 3-pair sentence
    assert curve[2]["perplexity_of_mean_nll"] == pytest.approx(math.exp(np.mean(expected)))


@pytest.mark.parametrize("codebook", [CODEBOOK_SIZE, 1000])
def test_unigram_baseline(sentences, codebook):
    """Add-one smoothing over the codes the tokenizer has: 7192 impossible ids would inflate a 1000-code baseline."""
    found, _ = sentences
    found = [Sentence(s.key, s.kind, s.images % codebook) for s in found]
    counts = np.ones(codebook)
    for s in found:
        np.add.at(counts, s.images.flatten().numpy(), 1)
    p = counts / counts.sum()
    nlls = [-np.log(p[s.images[-1].numpy()]).mean() for s in found]
    assert unigram_perplexity(found, codebook)["mean_perplexity"] == pytest.approx(np.mean(np.exp(nlls)))


def test_pixel_metrics_match_direct_computation(model, sentences, tiny_tokenizer):
    found = sentences[0][3:]  # the pairs sentences: 3 context images each
    result = pixel_metrics(model, tiny_tokenizer, found)
    truth = tiny_tokenizer.decode(torch.stack([s.images[-1] for s in found])).double() / 255
    copy = tiny_tokenizer.decode(torch.stack([s.images[-2] for s in found])).double() / 255
    copy_mse = (copy - truth).square().flatten(1).mean(1)
    assert result["copy_last_mse"] == pytest.approx(copy_mse.mean().item())
    assert result["copy_last_psnr"] == pytest.approx(-10 * math.log10(copy_mse.mean().item()))  # of the mean MSE
    held = Sentence("held", "video", torch.cat([found[1].images[:-1], found[1].images[-2:-1]]))  # copying is exact
    assert math.isfinite(pixel_metrics(model, tiny_tokenizer, [found[0], held])["copy_last_psnr"])
    with torch.no_grad():  # greedy next frame by full recomputation
        seq = torch.cat([torch.full((2, 1), BOS_ID), torch.stack([s.images[:-1].flatten() for s in found])], 1)
        for _ in range(T):
            seq = torch.cat([seq, model(seq)[:, -1, :CODEBOOK_SIZE].argmax(-1, keepdim=True)], 1)
    predicted = tiny_tokenizer.decode(seq[:, -T:]).double() / 255
    assert result["model_mse"] == pytest.approx((predicted - truth).square().flatten(1).mean(1).mean().item())
    assert result["model_psnr"] == pytest.approx(-10 * math.log10(result["model_mse"]))


def test_cli_writes_report_and_plot(tmp_path, shards, model, tiny_tokenizer_dir, capsys):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict()}, tmp_path / "m.ckpt")
    out = tmp_path / "eval"
    main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(shards), "--tokenizer", str(tiny_tokenizer_dir),
          "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["sentences"] == 5 and report["pixels"]["count"] == 5
    assert list(report["vs_context"]) == ["0", "1", "2", "3", "4", "5", "6"]
    assert list(report["vs_pairs"]["pairs"]) == ["0", "1"]  # 2 pairs per sentence: 0 or 1 example before the query
    assert "## pairs: answer perplexity against example pairs before the query" in (out / "report.md").read_text()
    assert Image.open(out / "perplexity_vs_pairs_pairs.png").format == "PNG"
    found, _ = read_sentences(sorted(shards.glob("*.tar")), T)
    for kind, members in (("all", found), ("video", found[:3]), ("pairs", found[3:])):  # each kind its own baseline
        assert kind == "all" or [s.kind for s in members] == [kind] * len(members)
        assert report["unigram"][kind] == pytest.approx(unigram_perplexity(members, CODEBOOK_SIZE)), kind
    text = (out / "report.md").read_text()
    video = next(line for line in text.splitlines() if line.startswith("| video | 3 |"))
    assert video.endswith(f" | {report['unigram']['video']['mean_perplexity']:.2f} |")
    assert list(report["context_gain"]["nll"]) == ["1", "2", "6"]  # 8 frames asked, 6 fit
    assert "## Video: which tokens the context helps" in (out / "report.md").read_text()
    assert "| copy the image before (video: the last frame; pairs: the query) |" in printed and "evaluated 5 sentences: perplexity" in printed
    main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(shards), "--tokenizer", str(tiny_tokenizer_dir),
          "--out", str(tmp_path / "no_pixels"), "--pixel-sentences", "0"])
    assert "pixels" not in json.loads((tmp_path / "no_pixels" / "report.json").read_text())  # skipped, not NaN
    capsys.readouterr()
    plot = Image.open(out / "perplexity_vs_context.png")
    assert plot.format == "PNG" and plot.size == (720, 480)


def test_report_json_of_a_broken_model_is_strict_json(tmp_path, shards, model):
    """A model past e^709 perplexity: report.json writes the infinite perplexities as null (Python's `Infinity`
    is not JSON; strict readers refuse the file), and report.md still says inf."""
    state = {f"model.{k}": v * 1e6 if k == "head.weight" else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lvm_config": model.cfg.to_dict()}, tmp_path / "m.ckpt")
    main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(shards), "--tokens-per-image", str(T),
          "--out", str(tmp_path / "eval")])

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    report = json.loads((tmp_path / "eval" / "report.json").read_text(), parse_constant=refuse)
    assert report["perplexity"]["all"]["mean_perplexity"] is None and report["perplexity"]["all"]["mean_nll"] > 709
    assert "| inf |" in (tmp_path / "eval" / "report.md").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m.ckpt", "--sentences", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none'}: no .tar shards found (no such file or directory)\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["--model", "m.ckpt", "--sentences", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err == f"error: {tmp_path / 'empty'}: no .tar shards found\n"
    (tmp_path / "afile").write_text("")  # refused before anything loads: it was said after the whole set was scored
    with pytest.raises(SystemExit):
        main(["--model", "m.ckpt", "--sentences", str(tmp_path / "none"), "--out", str(tmp_path / "afile")])
    assert capsys.readouterr().err == f"error: {tmp_path / 'afile'}: --out exists and is not a folder\n"


def test_token_shards_given_as_sentences_are_named_for_what_they_are(tmp_path, model, capsys):
    """lvm.tokenize's shards hold one image per sample, no BOS: training says they are not sentences, evaluation
    only counted them skipped."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict()}, tmp_path / "m.ckpt")
    with wds.TarWriter(str(tmp_path / "photos.tar")) as tar:
        for i in range(2):
            tar.write({"__key__": f"img{i}", "tokens.npy": np.arange(T, dtype=np.uint16), "json": {}})
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(tmp_path / "photos.tar"), "--tokens-per-image",
              str(T), "--out", str(tmp_path / "eval")])
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'photos.tar'}: no usable sentences (skipped: {{'not [BOS, k x {T} tokens, EOS]': 2}}); "
        f"sentences are BOS, images of {T} tokens, EOS, as python -m sentences.build makes them from the model's "
        "tokenizer (token shards of lvm.tokenize are not sentences)\n")


@pytest.mark.parametrize("pattern", ["{}/*.tar", "{}/sentences-{{000000..000001}}.tar"])
def test_cli_takes_the_shard_patterns_training_takes(tmp_path, shards, model, pattern):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict()}, tmp_path / "m.ckpt")
    args = ["--model", str(tmp_path / "m.ckpt"), "--tokens-per-image", str(T), "--out", str(tmp_path / "eval")]
    report = run(parse_args([*args, "--sentences", pattern.format(shards)]))
    assert report["sentences"] == 5 and report["skipped"] == {
        "fewer than 2 images": 1, f"not [BOS, k x {T} tokens, EOS]": 1, "missing tokens.npy or json": 1}


def test_tokens_per_image_may_not_contradict_the_models_record(tmp_path, shards, model, capsys):
    """A wrong count reads every sentence as other "images": it evaluated the few whose length fit, silently."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict(), "tokenizer": {"name": "tiny", "tokens_per_image": T}},
               tmp_path / "m.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(shards), "--tokens-per-image", "3",
              "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --tokens-per-image: 3, but the model was trained on {T} tokens per image (tiny); leave it out\n")


def test_tokens_per_image_may_not_contradict_the_tokenizer(tmp_path, shards, model, tiny_tokenizer_dir, capsys):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict()}, tmp_path / "m.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(shards), "--tokens-per-image", "256",
              "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --tokens-per-image: 256, but the tokenizer {tiny_tokenizer_dir} gives {T} tokens per image; leave it out\n")


def test_a_context_that_holds_no_frame_is_refused(tmp_path, shards, model, capsys):
    """A model fed images too large for its context would report the 0-frame perplexity as its headline."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict()}, tmp_path / "m.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(shards), "--tokens-per-image", "57",
              "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: --tokens-per-image: the model's context of 112 tokens cannot hold one context frame and the frame to "
        "generate (57 tokens per image): is this the model's tokenizer?\n")
    assert not (tmp_path / "eval").exists()
    with pytest.raises(ValueError, match="cannot hold one context frame"):
        target_nlls(model, [Sentence("s", "video", torch.zeros(3, 57, dtype=torch.long))])


def test_cli_smooths_the_unigram_over_the_models_codebook_and_skips_codes_past_it(tmp_path, model, monkeypatch):
    """A sentence with a code the model's 1000-code tokenizer cannot give (tokenized with another) crashed the unigram
    after all the scoring (review 46 #5); it is skipped and counted like other unusable sentences."""
    g = torch.Generator().manual_seed(0)
    with wds.TarWriter(str(tmp_path / "sentences-000000.tar")) as tar:
        for i in range(3):
            tokens = sentence(4, g)
            tokens[1:-1] %= 1000
            tar.write({"__key__": f"v{i}", "tokens.npy": tokens, "json": {"kind": "video"}})
        tar.write({"__key__": "other", "tokens.npy": sentence(4, g), "json": {"kind": "video"}})  # codes up to 8191
        odd = sentence(3, g)
        odd[1:-1] %= 1000
        tar.write({"__key__": "odd", "tokens.npy": odd, "json": {"kind": "colorization"}})  # no [x1, y1, ...] to cut
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict(), "tokenizer": {"name": "fsq", "tokens_per_image": T, "codebook_size": 1000}},
               tmp_path / "m.ckpt")
    seen = []
    real = unigram_perplexity
    monkeypatch.setattr("lvm.evaluate.unigram_perplexity",
                        lambda found, codebook: seen.append(codebook) or real(found, codebook))
    report = run(parse_args(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(tmp_path), "--out", str(tmp_path / "eval")]))
    assert seen == [1000, 1000, 1000]  # all, colorization, video
    assert report["sentences"] == 4 and report["skipped"] == {"codes past the tokenizer's 1000": 1}
    assert report["vs_pairs"] == {}
    assert report["vs_pairs_left_out"] == {"colorization": {"of odd length (not [x1, y1, ..., xn, yn])": 1}}
    assert "No colorization curve: 1 sentences of odd length" in (tmp_path / "eval" / "report.md").read_text()


def test_each_sentence_is_scored_once_per_context_length(tmp_path, shards, model, monkeypatch):
    """The headline scored every video and pairs sentence again at the curves' longest context (review 46 #12):
    3 video sentences x 7 lengths (0..6 frames) and 2 pairs sentences x 2 (the query, and one pair before it)."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict()}, tmp_path / "m.ckpt")
    scored = []
    batches = evaluate_module._batches
    monkeypatch.setattr(evaluate_module, "_batches", lambda items, size: scored.extend(items) or batches(items, size))
    report = run(parse_args(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(shards), "--out",
                             str(tmp_path / "eval"), "--pixel-sentences", "0", "--tokens-per-image", str(T)]))
    assert len(scored) == 3 * 7 + 2 * 2
    assert report["perplexity"]["video"]["mean_perplexity"] == report["vs_context"][6]["mean_perplexity"]
    assert report["perplexity"]["pairs"]["mean_perplexity"] == report["vs_pairs"]["pairs"][1]["mean_perplexity"]


def test_sentences_of_another_tokenizer_warn_and_an_unfinished_build_is_refused(tmp_path, shards, model, capsys,
                                                                                   tiny_tokenizer_dir):
    """Sentences another tokenizer made scored perplexity in the hundred thousands without a word, and a build that
    had not finished was scored as a whole held-out set; training refuses both (review 62 #2, #9)."""
    folder = tmp_path / "held-out"
    folder.mkdir()
    for shard in shards.glob("*.tar"):
        (folder / shard.name).write_bytes(shard.read_bytes())
    record = {"tokens_per_image": T, "codebook_size": CODEBOOK_SIZE}
    index = {"format": "lvm-sentences/1", "tokenizer": {"name": "theirs", "digest": "b" * 64, **record},
             "shards": {shard.name: {} for shard in folder.glob("*.tar")}}
    (folder / "index.json").write_text(json.dumps(index))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lvm_config": model.cfg.to_dict(),
                "tokenizer": {"name": "mine", "digest": "a" * 64, **record}}, tmp_path / "m.ckpt")
    args = ["--model", str(tmp_path / "m.ckpt"), "--sentences", str(folder), "--out", str(tmp_path / "eval")]
    main(args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {folder}: sentences made by tokenizer theirs (digest bbbbbbbbbbbb, {T} tokens per "
                        f"image, {CODEBOOK_SIZE} codes), not the one {tmp_path / 'm.ckpt'} was trained on, mine (digest "
                        f"aaaaaaaaaaaa, {T} tokens per image, {CODEBOOK_SIZE} codes): their perplexities measure tokens "
                        "it never learnt"]
    # a model that records no tokenizer, and --tokenizer another than the sentences': the pixels decode wrong (review 64 #1)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lvm_config": model.cfg.to_dict()},
               tmp_path / "bare.ckpt")
    main(["--model", str(tmp_path / "bare.ckpt"), "--sentences", str(folder), "--out", str(tmp_path / "eval2"),
          "--tokenizer", str(tiny_tokenizer_dir), "--pixel-sentences", "1"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {folder}: sentences made by tokenizer theirs (digest ")
    assert warnings[0].endswith("the pixel figures decode them with the wrong tokenizer")
    (folder / "index.json").rename(folder / "spec.json")  # what a build killed before its end leaves
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {folder}: a sentences.build that has not finished (spec.json but no "
                                       "index.json); run it again with the same --spec and --out to complete it\n")


def test_sequence_sentences_alone_say_why_there_is_no_context_curve(tmp_path, model):
    """The curve reads `kind: video` sentences; held-out frame folders built as `sequence` got none, unexplained
    (review 62 #7)."""
    g = torch.Generator().manual_seed(3)
    with wds.TarWriter(str(tmp_path / "sentences-000000.tar")) as tar:
        for i in range(2):
            tar.write({"__key__": f"s{i}", "tokens.npy": sentence(4, g), "json": {"kind": "sequence"}})
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lvm_config": model.cfg.to_dict()},
               tmp_path / "m.ckpt")
    main(["--model", str(tmp_path / "m.ckpt"), "--sentences", str(tmp_path), "--out", str(tmp_path / "eval"),
          "--tokens-per-image", str(T)])
    assert "No context curve: it reads `kind: video` sentences" in (tmp_path / "eval" / "report.md").read_text()
    assert not (tmp_path / "eval" / "perplexity_vs_context.png").exists()
