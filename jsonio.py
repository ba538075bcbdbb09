"""Files every stage reads and writes: JSONL read with errors naming the file, line and field; JSON, JSONL
and CSV written whole or not at all (a temp file, then a rename); append-only outputs resumed after a kill
(a torn last line cut off) and the part files of a multi-process run merged into one canonical file.
"""
import glob
import json
import os
import tempfile


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


def read_jsonl_lines(path, required=()):
    """[(line number, record)] of a JSONL file (blank lines skipped); a malformed line or a missing field
    raises DataError naming the file, the line and the field."""
    records = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, path, lineno)
            if not line.strip():
                continue
            rec = parse_json(line, f"{path}:{lineno}")
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for field in required:
                if field not in rec:
                    raise DataError(f"{path}:{lineno}: missing field '{field}'")
            records.append((lineno, rec))
    return records


def parse_json(text, where, hint=""):
    """json.loads, with every way a text can fail to parse as one DataError naming where: bad syntax, an integer
    past Python's 4,300-digit limit, nesting deeper than the parser's recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
    except ValueError as e:  # an integer too long to convert
        raise DataError(f"{where}: not usable JSON ({e}){hint}") from None
    except RecursionError:
        raise DataError(f"{where}: not usable JSON (nested too deep){hint}") from None


def decode_line(raw, path, lineno):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_jsonl(path, required=()):
    """Records of a JSONL file (see read_jsonl_lines)."""
    return [rec for _, rec in read_jsonl_lines(path, required)]


def check_unique_ids(numbered, path):
    """[(line, record)] must not repeat an id: a repeated step would be trained or probed twice."""
    first = {}
    for lineno, rec in numbered:
        if rec.get("id") in first:
            raise DataError(f"{path}:{lineno}: field 'id': duplicate {rec['id']!r} (first on line {first[rec['id']]})")
        first[rec.get("id")] = lineno


def _mkstemp(folder, suffix):
    """A temp file for an atomic write, with the mode a plain open() would give (mkstemp's is 0600,
    which would make a shared results folder unreadable to collaborators)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_text_atomic(path, text):
    """Write text whole or not at all: a temp file in the same folder, then a rename over the target. A refused
    write (disk full, permissions) is an OSError naming path, and the target keeps what it held."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _mkstemp(folder, os.path.splitext(path)[1])
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, path) from None
        raise


def write_jsonl_atomic(path, records):
    """Write all records or nothing (write_text_atomic)."""
    write_text_atomic(path, "".join(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n" for rec in records))


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def umask_mode(path):
    """Give files under path (a file or a folder) the mode a plain open() would, and folders the mode of a
    plain mkdir: writers such as safetensors' make 0600 files, and tempfile.mkdtemp 0700 folders, unreadable
    to collaborators sharing a results folder."""
    umask = os.umask(0)
    os.umask(umask)
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~umask)
        return
    for root, _, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def read_done(path):
    """Records already in an append-only output (resume); a torn last line from a kill is cut off."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the process died mid-write: drop the partial line so appends stay valid JSONL
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for lineno, raw in enumerate(data[:end].split(b"\n"), 1):
        line = decode_line(raw, path, lineno)
        if line.strip():
            # damage other than a torn last line: never guess, never overwrite
            records.append(parse_json(line, f"{path}:{lineno}", "; fix or remove that line to resume"))
    return records


def part_path(path, rank, world):
    """Where one process of a multi-process run appends: <name>.part-<rank>.jsonl beside path (path itself alone)."""
    return path if world == 1 else f"{path[:-len('.jsonl')]}.part-{rank}.jsonl"


def parts_of(path):
    """The part files a multi-process run left beside path (records.jsonl -> records.part-*.jsonl), sorted."""
    return sorted(glob.glob(f"{glob.escape(path[:-len('.jsonl')])}.part-[0-9]*.jsonl"))


def read_done_all(path):
    """Records already in path and in any part files beside it (a killed multi-process run's), path's first."""
    return [r for p in [path] + parts_of(path) for r in read_done(p)]


def merge_parts(path, order):
    """Rewrite path whole from itself and its part files, then remove the parts: the records in a canonical
    order (order(record): a sort key; equal keys keep file order, so a retried episode stays after its errored
    record), each distinct record once. The file is then the same whatever the number of processes was."""
    records, seen = [], set()
    for r in read_done_all(path):
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(r)
    records.sort(key=order)
    write_jsonl_atomic(path, records)
    for p in parts_of(path):
        os.remove(p)
    return records


def append_jsonl(f, records):
    """Append and flush, so a kill loses at most the record being written (a refused write: an OSError naming f)."""
    try:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
    except OSError as e:
        raise OSError(e.errno, e.strerror, f.name) from None


def write_csv_atomic(path, rows):
    """Rows (dicts) as CSV, columns in first-seen order; all or nothing like write_jsonl_atomic."""
    import csv
    import io
    cols = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
