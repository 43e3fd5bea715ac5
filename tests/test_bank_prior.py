"""The bank prior: images the original model drew for caption-bank prompts that name no target, which the released
model must keep denoising. Its gradient is checked with the other terms' in tests/test_meta_gradient.py."""

import csv
import json

import torch

from mima.cli import main
from mima.data.captions import load_caption_bank
from mima.data.image_folder import read_image_folder
from mima.models.encoding import Batch, EncodedImages
from test_immunize import _assert_term_adds_its_weighted_log, _prepared_on_stripes


def test_the_bank_prior_is_the_released_models_loss_on_one_batch_of_bank_images(tiny_components):
    from mima.immunize import ImmunizeConfig

    config = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, bank_prior_weight=0.0, caption_bank="toy",
                            bank_prior_target="noise")  # switched on below
    immunizer, batches = _prepared_on_stripes(tiny_components, "mima", config)
    size = immunizer.unet.config.sample_size
    latents = torch.randn(5, 4, size, size, generator=torch.Generator().manual_seed(3))
    hidden = tiny_components.encode_prompts(["a painting in rings style"] * 5).detach()
    immunizer.bank = EncodedImages(latents, 0.1 * torch.ones_like(latents), hidden)

    base, batch_size = immunizer.base_parameters(), next(iter(batches.values()))[0].latents.shape[0]
    g = torch.Generator().manual_seed(1)
    by_hand = immunizer.loss(base, Batch(*immunizer.bank.sample(batch_size, g)[:2]), g)
    torch.testing.assert_close(immunizer.bank_prior_loss(base, batches, torch.Generator().manual_seed(1)), by_hand)
    _assert_term_adds_its_weighted_log(immunizer, batches, "bank_prior", 2.0)


def test_the_distilled_bank_prior_is_the_gap_to_the_original_models_prediction(tiny_components):
    """`bank_prior_target: original`: zero at the original weights; away from them, the MSE between the released
    and the original model's predictions under the noise and timesteps the denoising term would draw."""
    from mima.functional import unet_call_with
    from mima.immunize import ImmunizeConfig
    from mima.losses import draw_noise

    config = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, caption_bank="toy", bank_prior_weight=1.0,
                            bank_prior_target="original")
    immunizer, batches = _prepared_on_stripes(tiny_components, "mima", config)
    size = immunizer.unet.config.sample_size
    latents = torch.randn(5, 4, size, size, generator=torch.Generator().manual_seed(3))
    hidden = tiny_components.encode_prompts(["a painting in rings style"] * 5).detach()
    immunizer.bank = EncodedImages(latents, 0.1 * torch.ones_like(latents), hidden)
    base = immunizer.base_parameters()
    immunizer.original = {name: base[name].detach().clone() for name in immunizer.upper_names}
    assert immunizer.bank_prior_loss(base, batches, torch.Generator().manual_seed(1)).item() == 0.0

    moved = {**base, **{n: base[n] + 0.05 * torch.randn(base[n].shape, generator=torch.Generator().manual_seed(4))
                        for n in immunizer.upper_names}}
    batch_size, g = next(iter(batches.values()))[0].latents.shape[0], torch.Generator().manual_seed(1)
    bank = Batch(*immunizer.bank.sample(batch_size, g)[:2])
    noise, timesteps = draw_noise(immunizer.scheduler, bank.latents, g)
    noisy = immunizer.scheduler.add_noise(bank.latents, noise, timesteps)
    predictions = [unet_call_with(immunizer.unet, params)(noisy, timesteps, bank.hidden) for params in (moved, base)]
    by_hand = ((predictions[0] - predictions[1]) ** 2).mean()
    distilled = immunizer.bank_prior_loss(moved, batches, torch.Generator().manual_seed(1))
    assert distilled.item() > 0
    torch.testing.assert_close(distilled, by_hand)



def test_a_share_of_the_bank_priors_images_is_taken_under_the_empty_prompt(tiny_components):
    """`bank_prior_unconditional`: each image of the batch drawn as before, then under the empty prompt's
    conditioning with that probability (one draw per image after the batch's); 0 draws nothing more."""
    from mima.immunize import ImmunizeConfig

    def batch_and_generator(share: float) -> tuple[Batch, torch.Generator]:
        config = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, caption_bank="toy", bank_prior_weight=1.0,
                                bank_prior_unconditional=share)
        immunizer, batches = _prepared_on_stripes(tiny_components, "mima", config)
        size = immunizer.unet.config.sample_size
        latents = torch.randn(5, 4, size, size, generator=torch.Generator().manual_seed(3))
        hidden = tiny_components.encode_prompts(["a painting in rings style"] * 5).detach()
        immunizer.bank = EncodedImages(latents, 0.1 * torch.ones_like(latents), hidden)
        immunizer.unconditional = empty
        g = torch.Generator().manual_seed(2)  # a seed whose draws take one image of two under the empty prompt
        return immunizer.bank_batches(batches, g)[0], g

    with torch.no_grad():
        empty = tiny_components.family.unconditional(tiny_components)
        rings = tiny_components.encode_prompts(["a painting in rings style"])
    (kept, after_kept), (half, after_half), (every, _) = (batch_and_generator(s) for s in (0.0, 0.5, 1.0))
    torch.testing.assert_close(half.latents, kept.latents)
    torch.testing.assert_close(kept.hidden, rings.expand_as(kept.hidden))
    torch.testing.assert_close(every.hidden, empty.expand_as(every.hidden))
    drawn = torch.rand(len(half.hidden), generator=after_kept) < 0.5  # the draw after the batch's
    assert 0 < drawn.sum() < len(drawn)
    torch.testing.assert_close(half.hidden, torch.where(drawn[:, None, None], empty, rings))
    assert torch.equal(after_kept.get_state(), after_half.get_state())  # that draw and no other

def test_cli_immunize_draws_the_bank_priors_images_under_captions_naming_no_target(tiny_model_dir, tmp_path, capsys):
    """The bank prior is on by default, as a distillation: the original model draws `--n-bank-images` images into
    data/bank-prior/, under captions spread over the bank, none naming a target; the term is logged, zero at the
    first step (the teacher is the model as the immunization found it), another with `--bank-prior-unconditional`;
    `--bank-prior-weight 0` draws none; a misspelt caption file fails in one line before any image is drawn, writing
    nothing."""
    out = tmp_path / "run"
    args = ["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes,toy:dots", "--out", str(out),
            "--steps", "2", "--n-images", "4", "--n-class-images", "2", "--batch-size", "2", "--caption-bank", "toy",
            "--attackers", "lora", "--n-bank-images", "6"]
    assert main(args) == 0, capsys.readouterr().err
    images, captions = read_image_folder(out / "data" / "bank-prior")
    assert len(images) == 6 and len(set(captions)) == 6
    assert not any("stripes" in caption or "dots" in caption for caption in captions)
    assert set(captions) < set(load_caption_bank("toy"))
    record = json.loads((out / "immunization.json").read_text())
    assert record["config"]["bank_prior_weight"] == 5.0 and record["config"]["bank_prior_target"] == "original"
    assert record["log"][0]["bank_prior"] == 0.0 < record["log"][1]["bank_prior"]

    empty = tmp_path / "empty"  # every bank image under the empty prompt: the same run, another bank prior
    assert main([*args, "--out", str(empty), "--bank-prior-unconditional", "1"]) == 0, capsys.readouterr().err
    unconditional = json.loads((empty / "immunization.json").read_text())
    assert unconditional["config"]["bank_prior_unconditional"] == 1.0
    assert unconditional["log"][0]["objective"] == record["log"][0]["objective"]
    assert unconditional["log"][1]["bank_prior"] not in (0.0, record["log"][1]["bank_prior"])

    off = tmp_path / "off"
    assert main([*args[:-2], "--out", str(off), "--bank-prior-weight", "0"]) == 0, capsys.readouterr().err
    assert "bank_prior" not in json.loads((off / "immunization.json").read_text())["log"][0]
    assert not (off / "data" / "bank-prior").exists()

    capsys.readouterr()
    missing = tmp_path / "missing.txt"
    code = main([*args, "--out", str(tmp_path / "other"), "--bank-prior-captions", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mima: error:") and str(missing) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other" / "data").exists()


def test_the_bank_prior_reads_its_own_caption_file(tiny_model_dir, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a painting in rings style\na painting in stripes style\n")
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out", str(out),
                 "--steps", "1", "--n-images", "4", "--n-class-images", "2", "--batch-size", "2", "--attackers",
                 "lora", "--bank-prior-weight", "0.5", "--n-bank-images", "3", "--bank-prior-captions", str(captions)])
    assert code == 0, capsys.readouterr().err
    with open(out / "data" / "bank-prior" / "metadata.csv", newline="") as f:
        assert [row["prompt"] for row in csv.DictReader(f)] == ["a painting in rings style"] * 3
