"""Property-based tests of the upload splitter (gateway/multipart.py).

Valid bodies come from urllib3's encoder (what `requests` sends) and from a small RFC 7578 encoder
here that also writes a preamble, an epilogue and part headers urllib3 never writes. The part data
is binary and leans towards CR, LF, "--" and prefixes of the boundary. Oracles: the parts that went
in; werkzeug's own parser (what `request.files` would give); and the splitter this one replaced,
kept below, which must agree with it on every input, down to the error message.
"""
import io

from hypothesis import assume, example, given, settings, strategies as st
from urllib3.fields import RequestField
from urllib3.filepost import encode_multipart_formdata
from werkzeug.formparser import parse_form_data
from werkzeug.test import EnvironBuilder

from gateway.multipart import MalformedMultipart, Part, boundary_of, parse_parts, part_from

FAST = settings(max_examples=300, deadline=None)
LEAN = settings(max_examples=200, deadline=None)  # the tests whose examples cost more

# RFC 2046 bchars; the boundary is 1-70 of them and does not end with a space.
BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
boundaries = st.text(BCHARS, min_size=1, max_size=70).map(str.strip).filter(bool).map(str.encode)

# Field names and filenames as browsers and urllib3 write them (HTML5: '"' goes as %22, CR and LF as
# %0D/%0A). werkzeug's header parser undoes only %22 and treats a backslash as an escape, so names with
# a backslash, '%', CR or LF do not survive the header encoding itself, whichever splitter runs.
names = st.text(st.characters(codec="utf-8", exclude_characters="\\%\r\n"), max_size=20)
filenames = st.none() | names


def legacy_parse_parts(body: bytes, boundary: bytes) -> list[Part]:
    """The splitter before the zero-copy rewrite (split + partition), the reference for behaviour."""
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary)
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise MalformedMultipart("the multipart body is incomplete (no closing boundary)")
    parts = []
    for chunk in chunks[1:-1]:
        head, separator, data = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise MalformedMultipart("a multipart part has no header/body separator")
        parts.append(part_from(head, data))
    return parts


def outcome(parse, body: bytes, boundary: bytes):
    """What a splitter makes of a body: the parts as plain tuples, or the MalformedMultipart message."""
    try:
        return [(p.name, p.filename, bytes(p.data)) for p in parse(body, boundary)]
    except MalformedMultipart as exc:
        return ("MalformedMultipart", str(exc))


@st.composite
def tricky_data(draw, boundary: bytes, max_pieces: int = 12) -> bytes:
    """Binary data made of random bytes and pieces of delimiters: CR, LF, '--', boundary prefixes."""
    near_misses = [b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"--", b"\r\n--", b"\n--" + boundary,
                   b"--" + boundary, boundary]
    near_misses += [b"\r\n--" + boundary[:k] for k in range(len(boundary))]
    pieces = draw(st.lists(st.binary(max_size=40) | st.sampled_from(near_misses), max_size=max_pieces))
    return b"".join(pieces)


def without_delimiter(boundary: bytes, data: bytes) -> bool:
    """An encoder's one rule: the data must not contain CRLF "--" boundary, even with the CRLFs around it."""
    return b"\r\n--" + boundary not in b"\r\n" + data + b"\r\n"


@st.composite
def uploads(draw, strict: bool = False):
    """(boundary, [(name, filename, data)]) that an encoder may put into one body. strict: the data does
    not even contain '--' boundary (werkzeug also splits on LF/CR '--' boundary, as RFC 2046 does not)."""
    boundary = draw(boundaries)
    fields = draw(st.lists(st.tuples(names, filenames, tricky_data(boundary)), max_size=5))
    for _, _, data in fields:
        assume(b"--" + boundary not in data if strict else without_delimiter(boundary, data))
    return boundary, fields


def urllib3_body(boundary: bytes, fields) -> bytes:
    request_fields = []
    for name, filename, data in fields:
        field = RequestField(name, data, filename=filename)
        field.make_multipart(content_type="application/octet-stream" if filename is not None else None)
        request_fields.append(field)
    body, content_type = encode_multipart_formdata(request_fields, boundary=boundary.decode())
    assert content_type.endswith(boundary.decode())
    return body


def rfc7578_body(boundary: bytes, fields, preamble: bytes, epilogue: bytes, padding: bytes, headers: bytes,
                 leading_crlf: bool) -> bytes:
    """Written by hand: an optional preamble (or CRLF) before the first delimiter, transport padding
    after each delimiter, extra part headers around Content-Disposition, an epilogue."""
    out = [preamble + b"\r\n" if preamble else b"\r\n" if leading_crlf else b""]
    for name, filename, data in fields:
        disposition = b'form-data; name="%s"' % name.replace('"', "%22").encode()
        if filename is not None:
            disposition += b'; filename="%s"' % filename.replace('"', "%22").encode()
        out.append(b"--" + boundary + padding + b"\r\n" + headers + b"Content-Disposition: " + disposition
                   + b"\r\n" + headers + b"\r\n" + data + b"\r\n")
    out.append(b"--" + boundary + b"--" + padding + epilogue)
    return b"".join(out)


@FAST
@given(uploads())
@example((b"b0undary", [("image", "a.jpg", b"\r\n--b0undar\r\n\r\n--\r\n")]))
@example((b"x", [("image", "a.jpg", b"\r--x\n--x--"), ("image", None, b"\n--x\r")]))
@example((b"b", []))
def test_urllib3_bodies_split_into_exactly_their_parts(upload):
    boundary, fields = upload
    body = urllib3_body(boundary, fields)
    parts = parse_parts(body, boundary)
    assert [(p.name, p.filename, bytes(p.data)) for p in parts] == fields
    for part in parts:  # zero-copy: every part's data is a view into the body itself
        assert isinstance(part.data, memoryview) and part.data.obj is body


@LEAN
@given(uploads(), st.data())
def test_hand_written_bodies_with_preamble_padding_and_epilogue(upload, data):
    boundary, fields = upload
    delimiter = b"\r\n--" + boundary
    preamble = data.draw(tricky_data(boundary, 4).filter(lambda b: delimiter not in b"\r\n" + b + b"\r\n"))
    # The epilogue, like the preamble, must not hold a delimiter (a later one would count as the closing one).
    epilogue = data.draw((st.binary(max_size=30) | st.just(b"\r\n--")).filter(lambda b: delimiter not in b))
    padding = data.draw(st.sampled_from([b"", b" ", b"\t ", b"--"]))
    headers = data.draw(st.sampled_from([b"", b"Content-Type: image/jpeg\r\n", b"X-Other: a: b\r\n"]))
    body = rfc7578_body(boundary, fields, preamble, epilogue, padding, headers, data.draw(st.booleans()))
    assert [(p.name, p.filename, bytes(p.data)) for p in parse_parts(body, boundary)] == fields
    assert outcome(parse_parts, body, boundary) == outcome(legacy_parse_parts, body, boundary)


@LEAN
@given(uploads(strict=True))
def test_same_files_and_fields_as_werkzeug(upload):
    boundary, fields = upload
    body = urllib3_body(boundary, fields)
    environ = EnvironBuilder(method="POST", input_stream=io.BytesIO(body), content_length=len(body),
                             content_type=f'multipart/form-data; boundary="{boundary.decode()}"').get_environ()
    _, form, files = parse_form_data(environ)
    parts = parse_parts(body, boundary_of(environ["CONTENT_TYPE"]))
    ours_files, ours_form = {}, {}
    for part in parts:
        if part.filename is None:
            ours_form.setdefault(part.name, []).append(bytes(part.data).decode("utf-8", "replace"))
        else:
            ours_files.setdefault(part.name, []).append((part.filename, bytes(part.data)))
    theirs_files = {name: [(f.filename, f.read()) for f in files.getlist(name)] for name in files}
    assert ours_files == theirs_files
    assert ours_form == {name: form.getlist(name) for name in form}


@st.composite
def mutated_bodies(draw):
    """A valid body with a few random edits: cut, insert, overwrite, duplicate a slice, truncate."""
    boundary, fields = draw(uploads())
    body = bytearray(urllib3_body(boundary, fields))
    delimiter = b"\r\n--" + boundary
    insertable = st.binary(max_size=8) | st.sampled_from([delimiter, delimiter + b"--", b"\r\n\r\n", b"\r\n",
                                                           b"--", b'Content-Disposition: form-data; name="x"'])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body)))
        end = draw(st.integers(at, min(len(body), at + 40)))
        edit = draw(st.sampled_from(["cut", "insert", "overwrite", "duplicate", "truncate"]))
        if edit == "cut":
            del body[at:end]
        elif edit == "insert":
            body[at:at] = draw(insertable)
        elif edit == "overwrite":
            body[at:end] = draw(st.binary(min_size=end - at, max_size=end - at))
        elif edit == "duplicate":
            body[at:at] = body[at:end]
        else:
            del body[at:]
    return bytes(body), boundary


def assert_parts_or_malformed(body: bytes, boundary: bytes):
    try:
        parts = parse_parts(body, boundary)
    except MalformedMultipart as exc:
        assert str(exc)
        return
    assert all(isinstance(p, Part) and isinstance(p.name, str) and isinstance(p.data, memoryview) for p in parts)


@settings(max_examples=500, deadline=None)
@given(mutated_bodies())
def test_mutated_bodies_give_parts_or_malformed_multipart_like_before(mutated):
    body, boundary = mutated
    assert_parts_or_malformed(body, boundary)
    assert outcome(parse_parts, body, boundary) == outcome(legacy_parse_parts, body, boundary)


@settings(max_examples=500, deadline=None)
@given(boundaries, st.lists(st.binary(max_size=20) | st.sampled_from(
    [b"\r\n", b"\r\n\r\n", b"--", b"--\r\n", b"Content-Disposition: form-data; name=", b'"image"', b";",
     b"filename*=UTF-8''%ff", b"\xff\xfe", b":"]), max_size=30), st.data())
@example(b"b0undary", [], None)
def test_arbitrary_bytes_give_parts_or_malformed_multipart_like_before(boundary, pieces, data):
    pieces = list(pieces)
    delimiters = [b"--" + boundary, b"\r\n--" + boundary, b"\r\n--" + boundary + b"--"]
    if data is not None and pieces:  # sprinkle real delimiters between the random pieces
        for at in data.draw(st.lists(st.integers(0, len(pieces)), max_size=4)):
            pieces.insert(at, data.draw(st.sampled_from(delimiters)))
    body = b"".join(pieces)
    assert_parts_or_malformed(body, boundary)
    assert outcome(parse_parts, body, boundary) == outcome(legacy_parse_parts, body, boundary)


def test_the_known_bodies_keep_their_messages():
    # The body tests/test_stack.py sends (cut before its closing boundary), and the other two errors.
    cut = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\nabc'
    assert outcome(parse_parts, cut, b"b0undary") == (
        "MalformedMultipart", "the multipart body is incomplete (no closing boundary)")
    assert outcome(parse_parts, b"", b"b") == outcome(parse_parts, b"--b", b"b") == (
        "MalformedMultipart", "the multipart body is incomplete (no closing boundary)")
    assert outcome(parse_parts, b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--", b"b") == (
        "MalformedMultipart", "a multipart part has no Content-Disposition name")
    assert outcome(parse_parts, b"--b\r\nContent-Disposition: form-data; name=a\r\n--b--", b"b") == (
        "MalformedMultipart", "a multipart part has no header/body separator")
    assert outcome(parse_parts, b"--b--", b"b") == [] == outcome(parse_parts, b"pre\r\n--b--\r\n", b"b")
