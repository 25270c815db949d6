"""sdtrace's stdout hands the kernel whole lines (output.WholeLines): root-free, on a real pipe."""
import io
import os
import select

from hypothesis import given
from hypothesis import strategies as st

from sdtrace.present.output import WholeLines, line_chunks, whole_lines


@given(st.lists(st.binary(max_size=40).map(lambda line: line.replace(b"\n", b"") + b"\n"),
                max_size=30),
       st.integers(min_value=1, max_value=64))
def test_chunks_are_whole_lines_within_the_limit_unless_one_line_is_longer(lines, limit):
    data = b"".join(lines)
    chunks = [bytes(chunk) for chunk in line_chunks(memoryview(data), limit)]
    assert b"".join(chunks) == data
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= limit or chunk.count(b"\n") == 1


def test_a_line_reaches_the_pipe_whole_once_its_newline_is_written():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        with io.open(write_end, "w", encoding="utf-8", closefd=False) as stream:
            lines = WholeLines(stream)
            lines.write('{"ts": 1, ')
            assert select.select([read_end], [], [], 0)[0] == []      # nothing of it yet
            lines.write('"probe": "a:b"}\n{"ts": 2')
            assert os.read(read_end, 1 << 16) == b'{"ts": 1, "probe": "a:b"}\n'
            lines.write("}\n" + "é" * 3000 + "\n")
            assert os.read(read_end, 1 << 16) == ('{"ts": 2}\n' + "é" * 3000 + "\n").encode()
            lines.write("no newline")
            lines.flush()
            assert os.read(read_end, 1 << 16) == b"no newline"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_stream_without_a_file_descriptor_is_kept():
    stream = io.StringIO()
    assert whole_lines(stream) is stream
