#!/usr/bin/env bash
# The README's label-free RL table: for every dataset and seed, the base model's greedy accuracy and maj@32,
# vision-norm matching only, RL only, matching + RL (the defaults) and RL on one example, all on the same
# evaluation items. Every run directory is resumable: run it again and finished runs are reused.
#
#   scripts/rl-table.sh OUT [DATA ...]        # then: scripts/rl-table.sh --summary OUT
#
# Environment: TTRV (binary, default .build/release/ttrv), SEEDS ("0 1 2"), LIMIT (300 eval items),
# JOBS (parallel runs, 2, one thread each), ADAPT (extra `ttrv adapt` options, for lever searches),
# VARIANTS (which adapt runs: "norm-rl rl one"), MAJ_SEEDS (seeds whose base evaluation also samples 32
# votes for maj@32: all by default; it costs as much as the rest of a seed's runs).
set -euo pipefail
B=${TTRV:-.build/release/ttrv}
SEEDS=${SEEDS:-0 1 2}
LIMIT=${LIMIT:-300}
JOBS=${JOBS:-2}
ADAPT=${ADAPT:-}
VARIANTS=${VARIANTS:-norm-rl rl one}
MAJ_SEEDS=${MAJ_SEEDS:-$SEEDS}

summary() {
    python3 - "$1" <<'EOF'
import json, os, sys, statistics as st
root = sys.argv[1]
def acc(path, key="accuracy"):
    try:
        with open(path) as f: v = json.load(f).get(key)
        return None if v is None else 100 * v
    except FileNotFoundError: return None
def stopped(path):
    try:
        with open(path) as f: return json.load(f).get("stopped_early")
    except FileNotFoundError: return None
cols = ["base greedy", "maj@32", "vision-norm only", "RL only", "norm + RL", "one-example (RL only)"]
stops = []
gains = {}  # data -> (RL only − base, norm + RL − norm only, one-example − base), paired by seed, means
print("| data | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for data in sorted(os.listdir(root)):
    d = os.path.join(root, data)
    if not os.path.isdir(d): continue
    rows = {c: [] for c in cols}
    for seed in sorted(os.listdir(d)):
        s = os.path.join(d, seed)
        vals = [acc(f"{s}/base.json"), acc(f"{s}/base.json", "maj_accuracy"),
                acc(f"{s}/norm-rl/report.json", "accuracy_after_norm"), acc(f"{s}/rl/report.json", "accuracy_after"),
                acc(f"{s}/norm-rl/report.json", "accuracy_after"), acc(f"{s}/one/report.json", "accuracy_after")]
        for c, v in zip(cols, vals):
            if v is not None: rows[c].append(v)
        stops += [f"{data} {seed} {v}: {r}" for v in ("rl", "norm-rl", "one") if (r := stopped(f"{s}/{v}/report.json"))]
    def cell(v):
        return "–" if not v else " / ".join(f"{x:.1f}" for x in v) + (f" (**{st.mean(v):.1f}**)" if len(v) > 1 else "")
    name = next((json.load(open(f"{d}/{s}/base.json"))["dataset"] for s in sorted(os.listdir(d))
                 if os.path.exists(f"{d}/{s}/base.json")), data)
    print(f"| {name} | " + " | ".join(cell(rows[c]) for c in cols) + " |")
    def paired(a, b):
        n = min(len(rows[a]), len(rows[b]))
        return st.mean(rows[a][i] - rows[b][i] for i in range(n)) if n else None
    gains[name] = (paired("RL only", "base greedy"), paired("norm + RL", "vision-norm only"),
                   paired("one-example (RL only)", "base greedy"), len(rows["RL only"]))
for s in stops: print(f"\nstopped early (by the collapse guard, start restored): {s}")
print("\n| data | RL only − base | norm + RL − norm only | one-example − base | seeds |\n|---|---|---|---|---|")
fmt = lambda v: "–" if v is None else f"{v:+.1f}"
for name, g in gains.items(): print(f"| {name} | {fmt(g[0])} | {fmt(g[1])} | {fmt(g[2])} | {g[3]} |")
for group in ("fashion-mnist", "easy-vqa"):
    sel = [g for n, g in gains.items() if n.startswith(group)]
    means = [st.mean([g[i] for g in sel if g[i] is not None]) if any(g[i] is not None for g in sel) else None
             for i in range(3)]
    if sel: print(f"| mean, {group} | " + " | ".join(fmt(m) for m in means) + f" | |")
EOF
}

if [[ ${1:-} == --summary ]]; then summary "$2"; exit; fi
OUT=${1:?usage: scripts/rl-table.sh OUT [DATA ...]}; shift
DATA=${*:-fashion-mnist-c:gaussian_noise:3 fashion-mnist-c:contrast:5 fashion-mnist-c:gaussian_blur:5 \
fashion-mnist-c:shot_noise:5 easy-vqa-c:gaussian_noise:5 easy-vqa-c:contrast:5}

# One (data, seed): the base evaluation (with 32 votes for maj@32) is every adapt run's eval_before.json (adapt reuses an
# evaluation of the same data and size), so the three runs share it.
one() {
    local data=$1 seed=$2 dir=$3 common=(--threads 1 --seed "$2")
    mkdir -p "$dir"
    local votes=0
    [[ " $MAJ_SEEDS " == *" $seed "* ]] && votes=32
    [[ -f $dir/base.json ]] || "$B" eval --model default --data "$data" --limit "$LIMIT" --votes $votes --max-tokens 8 \
        --json "$dir/base.json" "${common[@]}" > "$dir/base.log" 2>&1
    for v in norm-rl rl one; do
        mkdir -p "$dir/$v" && cp -n "$dir/base.json" "$dir/$v/eval_before.json"
    done
    local v args
    for v in $VARIANTS; do
        case $v in
            norm-rl) args=(--eval-after-norm) ;;
            rl) args=(--no-vision-norm) ;;
            one) args=(--no-vision-norm --one-example) ;;
            *) echo "unknown variant $v" >&2; return 1 ;;
        esac
        # shellcheck disable=SC2086
        "$B" adapt --data "$data" --eval-limit "$LIMIT" "${args[@]}" --out "$dir/$v" "${common[@]}" $ADAPT \
            >> "$dir/adapt.log" 2>&1
    done
    echo "done $data seed $seed"
}

for data in $DATA; do
    for seed in $SEEDS; do
        while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
        one "$data" "$seed" "$OUT/${data//:/_}/s$seed" &
    done
done
wait
summary "$OUT"
