"""How tests/data/vla_b11fa8d_* were made: two tiny VLA checkpoints in the format of commit b11fa8d
(before the VLA split; config.json still holds spatial_readout, action_decoding, expectation_loss)
and what that code's model did on one fixed input (vla_b11fa8d_expected.json).

    git worktree add /tmp/b11fa8d b11fa8d
    cd /tmp/b11fa8d && PYTHONPATH=. HF_HUB_OFFLINE=1 python <repo>/tests/data/make_vla_b11fa8d.py <repo>/tests/data

tests/test_vla_migration.py loads them with today's code."""
import json, sys
from pathlib import Path
import numpy as np, torch
import lapa_training
from lapa_training.vla import ActionBins, VLAConfig, VLAModel

out = Path(sys.argv[1])
SMALL = dict(image_size=32, vision_overrides={"image_size": 32, "grid": 4, "channels": [4, 4, 8], "hidden_size": 8},
             language_overrides={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64},
             max_text_tokens=16, spatial_readout=0, objective="action", stage="finetune", num_bins=8)
CASES = {
    "recipe": dict(action_head_type="regression", text_first=True, vision_film=True, keypoints=2,
                   action_spread_floor=[0.001, 0.005]),
    "bins": dict(action_head_type="bins", chunk_size=2, action_decoding="argmax", expectation_loss=0.0),
}
rng = np.random.default_rng(0)
a = rng.normal(0, 0.01, (2000, 7)); a[:, 6] = rng.random(2000) < 0.4
bins = ActionBins.fit(a, num_bins=8)
image = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
instruction = "reach the red block"
expected = {"made_with": "lapa_training at b11fa8d", "image": "np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)",
            "instruction": instruction}
for name, kw in CASES.items():
    torch.manual_seed(0)
    model = VLAModel(VLAConfig.tiny(**{**SMALL, **kw}))
    with torch.no_grad():  # weights of a trained size, so the outputs are not all near zero
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.set_action_bins(bins)
    model.eval()
    path = model.save_pretrained(out / f"vla_b11fa8d_{name}")
    with torch.no_grad():
        px = model.preprocess_images(image)
        ids, mask = model.tokenize([instruction])
        o = model(px, ids, mask)
        actions = model.decode_actions(o)
    expected[name] = {"logits": o.logits[0].tolist(), "predictions": o.predictions[0].tolist(),
                      "actions": actions[0].tolist()}
(out / "vla_b11fa8d_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
print(lapa_training.__file__)
