#!/usr/bin/env bash
# The README's test command: installs what it needs from nothing, then runs the whole CPU test suite.
source "$(dirname "$0")/_env.sh"
set +e
# _env.sh installed the peers the README's peer claims are tested against: their tests must run, not skip
# (tests/test_peer_claims.py fails where one is missing)
export DIT_SPARSE_REQUIRE_PEERS=1
# two workers (CI has 2 cores), one test file per worker (module fixtures stay in one process);
# DIT_SPARSE_TEST_WORKERS=0 runs serially, =auto uses every core
python -m pytest -q -n "${DIT_SPARSE_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "no tests were collected: treating as a failure" >&2
    exit 1
fi
exit "$rc"
