#!/usr/bin/env bash
# Mutation testing of src/mmbalance/methods/ and src/mmbalance/evaluation/ with mutmut (not in CI).
#
#   scripts/mutation.sh                 # every method and evaluation module (long: about an hour on 2 cores)
#   scripts/mutation.sh arl ogm_ge      # only these modules' mutants (names of files in methods/ or evaluation/)
#   SAMPLE=120 scripts/mutation.sh dgl  # a seeded random sample of 120 mutants per module (a score estimate)
#
# mutmut copies the package to mutants/, mutates one line at a time and runs the tests that
# reach the mutated function (the test selection below: each module's own unit tests, not the
# slow CLI and two-process suites). Results: `mutmut results`, `mutmut show NAME`; the score
# and every surviving mutant with the reason it is harmless are recorded in docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mutmut ] || .venv/bin/pip install -q -c constraints.txt -e '.[dev]'
export OMP_NUM_THREADS=1
# the tests that exercise each module directly (the slow CLI and two-process suites are left out)
declare -A TESTS=([metrics]="tests/test_evaluation.py" [probe]="tests/test_evaluation.py"
                  [shapley]="tests/test_valuation.py tests/test_contribution_fast.py tests/test_properties.py" [contribution]="tests/test_valuation.py tests/test_contribution_fast.py"
                  [valuation]="tests/test_valuation.py" [base]="tests/test_joint.py tests/test_arl.py tests/test_precision.py"
                  [joint]="tests/test_joint.py" [unimodal]="tests/test_joint.py"
                  [_grad]="tests/test_agm.py tests/test_grad_scale.py" [imbalance]="tests/test_analyze.py")
mods=("$@")
if [ ${#mods[@]} -eq 0 ]; then
  mods=(metrics probe shapley contribution imbalance)
  for f in src/mmbalance/methods/*.py; do
    n=$(basename "$f" .py); [ "$n" = "__init__" ] || mods+=("$n")
  done
fi
selection=""
for m in "${mods[@]}"; do
  t=${TESTS[$m]:-tests/test_$m.py}
  for x in $t; do [ -f "$x" ] && case " $selection " in *" $x "*) ;; *) selection="$selection $x";; esac; done
done
cp pyproject.toml .pyproject.toml.mutation-backup
trap 'mv -f .pyproject.toml.mutation-backup pyproject.toml' EXIT   # the selection below is per run
python3 - $selection <<'PY'
import re, sys
p = "pyproject.toml"
s = open(p).read()
line = "pytest_add_cli_args_test_selection = [" + ", ".join(f'"{t}"' for t in sys.argv[1:]) + "]"
s = re.sub(r"^pytest_add_cli_args_test_selection = .*$", line, s, flags=re.M)
open(p, "w").write(s)
PY
rm -rf mutants
pats=()
for m in "${mods[@]}"; do
  for d in methods evaluation; do
    [ -f "src/mmbalance/$d/$m.py" ] && pats+=("mmbalance.$d.$m.*")
  done
done
if [ -n "${SAMPLE:-}" ]; then
  # a seeded random sample of SAMPLE mutants per module (all of a module's when it has fewer):
  # generate the mutants (mutmut stops at an empty filter after generating), list them, sample
  .venv/bin/mutmut run "zz_generate_only.*" >/dev/null 2>&1 || true
  mapfile -t names < <(.venv/bin/mutmut results --all true 2>/dev/null | python3 -c '
import random, sys
size, mods = int(sys.argv[1]), sys.argv[2:]
names = sorted(l.split(":")[0].strip() for l in sys.stdin if "__mutmut_" in l)
for m in mods:
    mine = [n for n in names if any(n.startswith(f"mmbalance.{d}.{m}.") for d in ("methods", "evaluation"))]
    print(*(sorted(random.Random(f"{m}:{size}").sample(mine, min(size, len(mine))))), sep="\n")
' "$SAMPLE" "${mods[@]}")
  pats=("${names[@]}")
  echo "sampled ${#pats[@]} mutants (SAMPLE=$SAMPLE per module)"
fi
.venv/bin/mutmut run --max-children "${JOBS:-2}" "${pats[@]}"
.venv/bin/mutmut results --all true 2>/dev/null | grep -v ": not checked" > mutation-results.txt || true
echo "survivors listed in mutation-results.txt"
