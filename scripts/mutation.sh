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
tests=(tests/test_arl.py tests/test_mla.py tests/test_mie.py tests/test_valuation.py tests/test_ogm_ge.py
       tests/test_qmf.py tests/test_pmr.py tests/test_agm.py tests/test_gblending.py tests/test_greedy.py
       tests/test_mses.py tests/test_mslr.py tests/test_evaluation.py tests/test_joint.py)
selection=$(printf '"%s", ' "${tests[@]}")
python3 - "$selection" <<'PY'
import re, sys
p = "pyproject.toml"
s = open(p).read()
line = f"pytest_add_cli_args_test_selection = [{sys.argv[1].rstrip(', ')}]"
s = re.sub(r"^pytest_add_cli_args_test_selection = .*$", line, s, flags=re.M) if "pytest_add_cli_args_test_selection" in s \
    else s.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + line + "\n")
open(p, "w").write(s)
PY
rm -rf mutants
if [ $# -gt 0 ]; then
  pats=()
  for m in "$@"; do
    for d in methods evaluation; do
      [ -f "src/mmbalance/$d/$m.py" ] && pats+=("mmbalance.$d.$m.*")
    done
  done
  .venv/bin/mutmut run --max-children "${JOBS:-2}" "${pats[@]}"
else
  .venv/bin/mutmut run --max-children "${JOBS:-2}"
fi
.venv/bin/mutmut results > mutation-results.txt || true
echo "survivors listed in mutation-results.txt"
