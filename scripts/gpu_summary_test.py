#!/usr/bin/env python3
"""Tests scripts/gpu_summary.py on a log `scripts/gpu-check run` really wrote, so that the
parsing follows the lines the binaries and PyTorch's scripts print:
tests/gpu-check/recorded.log is the run half on a CPU (`DEVICE=cpu SIZE=tiny ITERS=2
BATCHES=1,8,32`), from a folder laid out as `build` lays it but holding the CPU build's
binaries. Its figures mean nothing: tiny models on a shared machine, and PyTorch's CLIP
script times the full-size tower whatever SIZE says.

    python3 scripts/gpu_summary_test.py
"""

import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_summary  # noqa: E402

RECORDED = os.path.join(os.path.dirname(__file__), "..", "tests", "gpu-check", "recorded.log")


class RecordedRun(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(RECORDED, encoding="utf-8") as f:
            cls.text = f.read()
        cls.parsed = gpu_summary.parse(cls.text)

    def test_header_and_device(self):
        self.assertEqual(self.parsed.device, "cpu")
        self.assertEqual(self.parsed.size, "tiny")
        self.assertRegex(self.parsed.date, r"^\d{4}-\d{2}-\d{2}$")

    def test_every_parity_test_is_counted(self):
        ran = [
            line
            for line in self.text.splitlines()
            if re.match(r"^test \S+ \.\.\. (ok|FAILED)", line)
        ]
        self.assertGreater(len(ran), 0)
        self.assertEqual(len(self.parsed.passed) + len(self.parsed.failed), len(ran))
        self.assertTrue(any("yoloworld" in name for name in self.parsed.passed))

    def test_every_family_has_both_batches_on_our_side(self):
        self.assertEqual(
            list(self.parsed.families),
            ["clip", "siglip", "owlvit", "yoloworld", "paligemma"],
        )
        for fam in self.parsed.families.values():
            for bs in gpu_summary.COMPARED_BATCHES:
                self.assertIn(bs, fam.whole_path(), fam.name)

    def test_pytorch_sides_are_told_apart(self):
        clip = self.parsed.families["clip"]
        self.assertEqual(set(clip.ms["torch"]), {("image", 1), ("image", 8)})
        self.assertEqual(set(clip.ms["torch-bf16"]), {("image", 1), ("image", 8)})
        self.assertNotEqual(clip.ms["torch"], clip.ms["torch-bf16"])
        self.assertEqual(self.parsed.families["paligemma"].ms["torch-bf16"], {})
        self.assertTrue(self.parsed.families["yoloworld"].no_reference)

    def test_clip_is_compared_tower_to_tower(self):
        clip = self.parsed.families["clip"]
        ours, theirs = clip.compared("torch", 8)
        self.assertEqual(ours, clip.ms["candle"][("image", 8)])
        self.assertEqual(theirs, clip.ms["torch"][("image", 8)])
        self.assertNotEqual(ours, clip.whole_path()[8])

    def test_the_best_batch_is_the_fewest_ms_per_frame_on_the_whole_path(self):
        for fam in self.parsed.families.values():
            bs, ms = fam.best()
            self.assertEqual(ms, min(fam.whole_path().values()))
            self.assertEqual(fam.whole_path()[bs], ms)

    def test_summary_has_a_row_per_family_and_batch(self):
        summary = gpu_summary.render(self.parsed)
        for fam in self.parsed.families:
            for bs in gpu_summary.COMPARED_BATCHES:
                self.assertRegex(summary, rf"(?m)^{fam} +{bs} ")
            self.assertRegex(summary, rf"(?m)^  {fam}: bs=\d+ [\d.]+ frames/s, \d+ cameras$")
        self.assertIn(f"parity: {len(self.parsed.passed)} passed, 0 failed", summary)


class Lines(unittest.TestCase):
    def test_a_failed_test_and_a_failed_side_are_reported(self):
        run = gpu_summary.parse(
            "== gpu-check 2026-01-01 device=cuda size=full iters=5 batches=1,8\n"
            "gpu: NVIDIA H100 80GB HBM3, 580.1, 81559 MiB\n"
            "== parity\n"
            "test model::testing::parity::clip_matches_transformers ... FAILED\n"
            "== siglip\n"
            "[candle-siglip gpu] failed\n"
        )
        self.assertEqual(run.failed, ["model::testing::parity::clip_matches_transformers"])
        summary = gpu_summary.render(run)
        self.assertIn("FAILED model::testing::parity::clip_matches_transformers", summary)
        self.assertIn("siglip: no timing", summary)
        self.assertIn("candle side FAILED", summary)


if __name__ == "__main__":
    unittest.main()
