#!/usr/bin/env bash
# Mutation testing of src/mmbalance/methods/ and src/mmbalance/evaluation/ with mutmut (not in CI).
#
#   scripts/mutation.sh                 # every method and evaluation module (long: about an hour on 2 cores)
#   scripts/mutation.sh arl ogm_ge      # only these modules' mutants (names of files in methods/ or evaluation/)
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
                  [shapley]="tests/test_valuation.py" [contribution]="tests/test_valuation.py"
                  [valuation]="tests/test_valuation.py" [base]="tests/test_joint.py tests/test_arl.py"
                  [joint]="tests/test_joint.py" [unimodal]="tests/test_joint.py")
mods=("$@")
if [ ${#mods[@]} -eq 0 ]; then
  mods=(metrics probe shapley contribution)
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
.venv/bin/mutmut run --max-children "${JOBS:-2}" "${pats[@]}"
.venv/bin/mutmut results > mutation-results.txt || true
echo "survivors listed in mutation-results.txt"
