#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, made from the repository's fixtures.

    python3 fuzz/seeds.py OUT_DIR

writes OUT_DIR/<target>/ for each target, shaped as that target reads its input:
  mllp_framer            a limit byte, then fixtures wrapped in MLLP blocks (one and two per seed)
  hl7_intake_and_record  each HL7 fixture as is (and each message of it alone)
  hl7_batch              the batch fixtures, the other fixtures wrapped in BHS/BTS and FHS/FTS
  astm_link_and_records  each ASTM fixture as E1381 frames (ENQ .. EOT), a clock byte before
                         every 12 bytes as the target expects
  config_loader          docs/siterelay.example.toml and every TOML case in tests/config_catalogue.rs
Only synthetic data is in the fixtures; nothing here leaves the machine.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1]
# The 1.6 MB radiology PDF-in-OBX fixture (if present) slows every run: left out.
MAX_SEED = 64 * 1024


def fixtures(kind):
    d = os.path.join(ROOT, "tests", "fixtures", kind)
    out = []
    for name in sorted(os.listdir(d)):
        if name.startswith("."):
            continue
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        if len(data) <= MAX_SEED:
            out.append((name, data))
    return out


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def hl7_messages(data):
    """The messages of a fixture: split at each MSH, batch envelope segments dropped."""
    text = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    msgs, cur = [], []
    for seg in text.split(b"\r"):
        if not seg or seg[:3] in (b"FHS", b"BHS", b"BTS", b"FTS"):
            continue
        if seg.startswith(b"MSH") and cur:
            msgs.append(b"\r".join(cur) + b"\r")
            cur = []
        cur.append(seg)
    if cur:
        msgs.append(b"\r".join(cur) + b"\r")
    return msgs


def mllp(block):
    return b"\x0b" + block + b"\x1c\x0d"


def astm_frames(message):
    """ASTM E1381 framing: one frame per record (split at 240 bytes), FN 1..7,0."""
    out = bytearray(b"\x05")
    fn = 1
    records = [r for r in message.replace(b"\r\n", b"\n").replace(b"\n", b"\r").split(b"\r") if r]
    for rec in records:
        rec = rec + b"\r"
        pieces = [rec[i:i + 240] for i in range(0, len(rec), 240)]
        for i, p in enumerate(pieces):
            end = b"\x03" if i == len(pieces) - 1 else b"\x17"
            body = str(fn).encode() + p + end
            out += b"\x02" + body + b"%02X" % (sum(body) % 256) + b"\r\n"
            fn = (fn + 1) % 8
    out += b"\x04"
    return bytes(out)


def with_clock_bytes(data):
    """The ASTM target reads 13-byte pieces whose first byte advances the clock: no advance."""
    out = bytearray()
    for i in range(0, len(data), 12):
        out += b"\x00" + data[i:i + 12]
    return bytes(out)


hl7 = fixtures("hl7")
for name, data in hl7:
    write("hl7_intake_and_record", name, data)
    for i, m in enumerate(hl7_messages(data)):
        write("hl7_intake_and_record", f"{name}.{i}", m)
        write("mllp_framer", f"{name}.{i}", b"\xff" + mllp(m))
    msgs = hl7_messages(data)
    write("mllp_framer", f"{name}.all", b"\xff" + b"".join(mllp(m) for m in msgs[:2]))
    if data.startswith((b"FHS", b"BHS")):
        write("hl7_batch", name, data)
    body = b"".join(msgs)
    write("hl7_batch", f"{name}.bhs", b"BHS|^~\\&|LAB|SITE|||20260301120000||||B1\r" + body + b"BTS|%d\r" % len(msgs))
    write("hl7_batch", f"{name}.fhs", b"FHS|^~\\&|LAB|SITE|||20260301120000||||F1\r"
          b"BHS|^~\\&|LAB|SITE|||20260301120000||||B1\r" + body + b"BTS|%d\rFTS|1\r" % len(msgs))

for name, data in fixtures("astm"):
    write("astm_link_and_records", name, with_clock_bytes(astm_frames(data)))

with open(os.path.join(ROOT, "docs", "siterelay.example.toml"), "rb") as f:
    write("config_loader", "siterelay.example.toml", f.read())
# The catalogue (tests/config_catalogue.rs): its BASE configuration, and each case's edits
# (pairs of Rust string literals: replace the first by the second; an empty first appends).
with open(os.path.join(ROOT, "tests", "config_catalogue.rs"), encoding="utf-8") as f:
    src = f.read()
base = re.search(r'const BASE: &str = r#"(.*?)"#;', src, re.S).group(1)
LIT = r'"((?:[^"\\]|\\.)*)"'


def unescape(lit):
    out, i = [], 0
    while i < len(lit):
        c = lit[i]
        if c == "\\" and i + 1 < len(lit):
            nxt = lit[i + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r", "0": "\0"}.get(nxt, nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


write("config_loader", "catalogue_base.toml", base.encode())
n = 0
for m in re.finditer(r"edits: &\[(.*?)\],\n\s*ok:", src, re.S):
    text = base
    for a, b in re.findall(r"\(\s*" + LIT + r",\s*" + LIT + r",?\s*\)", m.group(1), re.S):
        a, b = unescape(a), unescape(b)
        text = text + b if a == "" else text.replace(a, b, 1)
    write("config_loader", f"catalogue_{n:03}.toml", text.encode())
    n += 1
print(f"seeds in {OUT}: " + ", ".join(
    f"{t} {len(os.listdir(os.path.join(OUT, t)))}" for t in sorted(os.listdir(OUT))))
