#!/usr/bin/env python3
"""Checks a classifier answer against the baseline's expected.json, as the baseline's run.sh
checks servers (top1 equal, score within 1e-4); exits non-zero otherwise.

    python bench/classify_answer.py EXPECTED_JSON MODEL ANSWER_JSON
"""
import json
import sys

expected, model, answer = sys.argv[1:]
want = json.load(open(expected))[model]
got = json.loads(answer)
print(f"{model} -> {answer} (reference: {want})")
assert got["top1"] == want["top1"] and abs(got["score"] - want["score"]) < 1e-4, (got, want)
