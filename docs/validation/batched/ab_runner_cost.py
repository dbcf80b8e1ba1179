"""A/B under the same load: CPU and wall time of the batched runners at batch 1 against the batch-1
runners (simspec.calibrate.runners) on one 100-token prompt, 24 new tokens, interleaved, 3 timed reps
each (the first rep is a warm-up). Usage: HF_HUB_OFFLINE=1 python docs/validation/batched/ab_runner_cost.py"""
import time, torch
torch.set_num_threads(1)
from simspec.calibrate.models import load_model
from simspec.calibrate.early_exit import LayeredLM
from simspec.calibrate.adapter import load_adapters
from simspec.calibrate import runners as R, batched as B
from simspec.calibrate.prompts import encode
m = load_model("smollm2-135m", "fp32", "cpu"); lm = LayeredLM(m.model)
ads = load_adapters("simspec/data/adapters/smollm2-135m", lm, [2])
ids = encode(m.tokenizer, "Explain why the sky is blue in two short paragraphs, for a child.")[:100]
NEW = 24
def one(kind):
    t = time.thread_time(); w = time.perf_counter()
    if kind == "b1-kang": r = R.KangarooRunner(lm, 2, ads[2], gamma=6, eta=0.6); toks = r.generate(ids, NEW).tokens
    if kind == "bb-kang": r = B.BatchedKangaroo(lm, 2, ads[2], 200, gamma=6, eta=0.6); toks = B.generate_batch(r, [ids], NEW)[0]
    if kind == "b1-draft": r = R.DraftRunner(lm, 4, draft_layers=5); toks = r.generate(ids, NEW).tokens
    if kind == "bb-draft": r = B.BatchedDraft(lm, 4, 200, draft_layers=5); toks = B.generate_batch(r, [ids], NEW)[0]
    return (time.thread_time() - t) * 1e3, (time.perf_counter() - w) * 1e3, toks
res = {}
for rep in range(4):
    for k in ("b1-kang", "bb-kang", "b1-draft", "bb-draft"):
        c, w, toks = one(k)
        if rep: res.setdefault(k, []).append((c, w))
        res.setdefault(k + "-toks", toks)
import statistics as S
for k in ("b1-kang", "bb-kang", "b1-draft", "bb-draft"):
    print(k, "cpu ms median %.0f  wall %.0f" % (S.median(c for c, _ in res[k]), S.median(w for _, w in res[k])))
print("same tokens kang", res["b1-kang-toks"] == res["bb-kang-toks"], "draft", res["b1-draft-toks"] == res["bb-draft-toks"])
