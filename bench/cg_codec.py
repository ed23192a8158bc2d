"""Instructions per item of the ways to send a chunk of 125,000 ints or
floats (docs/performance.md, "A typed chunk codec, evaluated again"):
callgrind of each snippet run 3 times minus once, over 2 x 125,000.
Load does not change the counts.  Needs valgrind.

    python bench/cg_codec.py            # the table's rows
    python bench/cg_codec.py "x = sorted(ints)"   # any snippet (names below)
"""
import re
import subprocess
import sys

N = 125_000
SETUP = f"""
import array, pickle, struct
from operator import countOf
N = {N}
ints = list(range(1000, 1000 + N))
floats = [x * 0.5 for x in ints]
int_pickle, float_pickle = pickle.dumps(ints, 5), pickle.dumps(floats, 5)
int_bytes, float_bytes = array.array('q', ints).tobytes(), array.array('d', floats).tobytes()
def unpack(code, data):
    a = array.array(code)
    a.frombytes(data)
    return a.tolist()
"""
ROWS = [
    "x = set(map(type, ints))",
    "x = countOf(map(type, ints), int)",
    "x = countOf(map(type, floats), float)",
    "x = pickle.dumps(ints, 5)",
    "x = pickle.dumps(floats, 5)",
    "x = struct.pack(f'{len(ints)}q', *ints)",
    "x = struct.pack(f'{len(floats)}d', *floats)",
    "x = array.array('q', ints)",
    "x = pickle.loads(int_pickle)",
    "x = pickle.loads(float_pickle)",
    "x = unpack('q', int_bytes)",
    "x = unpack('d', float_bytes)",
    "x = memoryview(int_bytes).cast('q').tolist()",
    "x = [y for y in pickle.loads(int_pickle)]",
    "x = [y for y in memoryview(int_bytes).cast('q')]",
    "x = [y for y in ints]",
]


def instructions(stmt, times):
    code = f"{SETUP}\nfor _ in range({times}):\n    {stmt}\n"
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1))


def main():
    for stmt in sys.argv[1:] or ROWS:
        per_item = (instructions(stmt, 3) - instructions(stmt, 1)) / (2 * N)
        print(f"{per_item:8.1f}  {stmt}", flush=True)


if __name__ == "__main__":
    main()
