/*
 * pgproxy.proxy._response_head: the one-pass response head reader in C.
 *
 * Invariant: read_head() returns None for exactly the heads for which
 * read_response_head_python() in pgproxy/proxy/response_head.py returns
 * None, and for every other head the parts from which response_head.py
 * builds the same ResponseHead. Any doubt returns None, and llhttp then
 * parses the head. The Python reader is the reference: read its docstring
 * for the heads it leaves to llhttp, and tests/proxy/test_response_head_c.py
 * compares the two readers on a seeded corpus of mutated heads.
 *
 * Memory: every offset is checked against the end of the data, or the
 * smaller max_head, before it is read, and there are no fixed-size buffers.
 * Every error path drops the references it holds, and a failed allocation
 * returns NULL with the exception set.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* Field kinds: the proxy's treatment of a field, by its name (RFC 9110
   section 7.6.1 for the hop-by-hop ones). */
enum field_kind {
    FIELD_PLAIN,      /* forwarded as received */
    FIELD_LENGTH,     /* Content-Length: forwarded, and it frames the body */
    FIELD_CONNECTION, /* read for its options, not forwarded */
    FIELD_DROPPED,    /* another hop-by-hop field */
    FIELD_VIA,        /* joined into the proxy's own Via */
    FIELD_UNREAD,     /* the head goes to llhttp */
};

/* The names that are not FIELD_PLAIN, in lower case, as in
   _KIND_BY_LOWER_NAME of response_head.py. */
static const struct {
    const char *lower;
    Py_ssize_t size;
    enum field_kind kind;
} SPECIAL_FIELDS[] = {
    {"content-length", 14, FIELD_LENGTH},
    {"connection", 10, FIELD_CONNECTION},
    {"keep-alive", 10, FIELD_DROPPED},
    {"te", 2, FIELD_DROPPED},
    {"trailer", 7, FIELD_DROPPED},
    {"upgrade", 7, FIELD_DROPPED},
    {"via", 3, FIELD_VIA},
    {"transfer-encoding", 17, FIELD_UNREAD},
    /* llhttp reads Proxy-Connection as Connection. */
    {"proxy-connection", 16, FIELD_UNREAD},
    /* `Connection: close` would also drop a field named "close". */
    {"close", 5, FIELD_UNREAD},
};

static const char VERSION[] = "HTTP/1.1 ";
#define VERSION_SIZE ((Py_ssize_t)(sizeof(VERSION) - 1))
/* Content-Length values of up to 18 digits fit in a long long. */
#define MAX_LENGTH_DIGITS 18

/* 1 for the bytes a field line or status line may hold besides the CRLF
   that ends it: HTAB, SP, VCHAR and obs-text (RFC 9110 section 5.5). */
static unsigned char line_bytes[256];
/* 1 for tchar (RFC 9110 section 5.6.2), the bytes of a field name. */
static unsigned char token_bytes[256];
/* 1 at the size of each name in SPECIAL_FIELDS ("transfer-encoding" is the
   longest). */
#define MAX_SPECIAL_SIZE 17
static unsigned char special_sizes[MAX_SPECIAL_SIZE + 1];

static void
fill_tables(void)
{
    for (int byte = 0; byte < 256; byte++) {
        line_bytes[byte] = byte == '\t' || (byte >= 0x20 && byte != 0x7F);
        token_bytes[byte] = (byte >= '0' && byte <= '9') ||
                            (byte >= 'a' && byte <= 'z') ||
                            (byte >= 'A' && byte <= 'Z') ||
                            (byte != 0 && strchr("!#$%&'*+-.^_`|~", byte));
    }
    size_t count = sizeof(SPECIAL_FIELDS) / sizeof(SPECIAL_FIELDS[0]);
    for (size_t i = 0; i < count; i++) {
        special_sizes[SPECIAL_FIELDS[i].size] = 1;
    }
}

/* The state of one read: the data, what was found so far, and the objects
   built from it. The objects are owned here until they are returned. */
struct head {
    const unsigned char *data;
    Py_ssize_t limit; /* the head and its final CRLF CRLF end before this */
    int status;
    long long length; /* -1 without Content-Length */
    PyObject *options; /* the Connection options, a value of the tokens
                          dict, or NULL */
    PyObject *unchanged_lines; /* list of bytes */
    PyObject *via;             /* list of bytes, or NULL */
    Py_ssize_t run_start;      /* where the current run of unchanged lines
                                  began */
};

#define ONES UINT64_C(0x0101010101010101)
#define HIGH_BITS UINT64_C(0x8080808080808080)

/* Return whether one of the 8 bytes of `word` is below 0x20 or is DEL.
   (x - 0x01..) & ~x & 0x80.. is nonzero exactly when a byte of x is 0, and
   with 0x20 in place of 0x01 when a byte is below 0x20. Bytes from 0x80 up
   (obs-text) have the high bit set in x and never count. */
static int
has_control_byte(uint64_t word)
{
    uint64_t below_space = (word - ONES * 0x20) & ~word & HIGH_BITS;
    uint64_t del = word ^ (ONES * 0x7F);
    uint64_t is_del = (del - ONES) & ~del & HIGH_BITS;
    return (below_space | is_del) != 0;
}

/* Return the offset of the first 8-byte word from `start` that contains a
   control byte or DEL, or of the last bytes before `limit` that do not fill
   a word. Words of SP, VCHAR and obs-text are checked 8 bytes at a time
   instead of one by one. find_line_end checks the rest byte by byte, and
   with it HTAB, which this function treats as a control byte. */
static Py_ssize_t
skip_plain_words(const struct head *head, Py_ssize_t start)
{
    Py_ssize_t i = start;
    while (head->limit - i >= 8) {
        uint64_t word;
        memcpy(&word, head->data + i, 8); /* no alignment needed */
        if (has_control_byte(word)) {
            break;
        }
        i += 8;
    }
    return i;
}

/* Return the offset of the CR of the CRLF that ends the line starting at
   `start`, or -1 when the line contains a byte that line_bytes rejects (LF
   included), a CR without LF, or ends at `limit`. */
static Py_ssize_t
find_line_end(const struct head *head, Py_ssize_t start)
{
    const unsigned char *data = head->data;
    Py_ssize_t i = skip_plain_words(head, start);
    while (i < head->limit && line_bytes[data[i]]) {
        i++;
    }
    if (i + 1 < head->limit && data[i] == '\r' && data[i + 1] == '\n') {
        return i;
    }
    return -1;
}

/* Return the code of `HTTP/1.1 NNN reason` in [0, end), or -1. SP after
   the code is required (RFC 9112 section 4), and the reason may be empty. */
static int
read_status(const unsigned char *data, Py_ssize_t end)
{
    if (end < VERSION_SIZE + 4 || data[VERSION_SIZE + 3] != ' ') {
        return -1;
    }
    int code = 0;
    for (Py_ssize_t i = VERSION_SIZE; i < VERSION_SIZE + 3; i++) {
        if (data[i] < '0' || data[i] > '9') {
            return -1;
        }
        code = code * 10 + (data[i] - '0');
    }
    return code;
}

/* Return whether the `size` bytes at `data` equal `lower` once their
   ASCII capitals are lowered, as bytes.lower() lowers them. */
static int
equals_lower(const unsigned char *data, Py_ssize_t size, const char *lower)
{
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char byte = data[i];
        if (byte >= 'A' && byte <= 'Z') {
            byte += 'a' - 'A';
        }
        if (byte != (unsigned char)lower[i]) {
            return 0;
        }
    }
    return 1;
}

static enum field_kind
classify_name(const unsigned char *name, Py_ssize_t size)
{
    /* Most names have a size that no special name has. */
    if (size > MAX_SPECIAL_SIZE || !special_sizes[size]) {
        return FIELD_PLAIN;
    }
    size_t count = sizeof(SPECIAL_FIELDS) / sizeof(SPECIAL_FIELDS[0]);
    for (size_t i = 0; i < count; i++) {
        if (SPECIAL_FIELDS[i].size == size &&
            equals_lower(name, size, SPECIAL_FIELDS[i].lower)) {
            return SPECIAL_FIELDS[i].kind;
        }
    }
    return FIELD_PLAIN;
}

/* Return the Content-Length of 1 to 18 digits in data[start:stop], or -1. */
static long long
read_length(const unsigned char *data, Py_ssize_t start, Py_ssize_t stop)
{
    if (stop <= start || stop - start > MAX_LENGTH_DIGITS) {
        return -1;
    }
    long long length = 0;
    for (Py_ssize_t i = start; i < stop; i++) {
        if (data[i] < '0' || data[i] > '9') {
            return -1;
        }
        length = length * 10 + (data[i] - '0');
    }
    return length;
}

/* Return the value of `tokens` whose bytes key equals data[start:stop], or
   NULL. Iterating the six keys compares them without building a bytes
   object for the value, and keeps the dict the one list of options. */
static PyObject *
find_options(PyObject *tokens, const unsigned char *data, Py_ssize_t start,
             Py_ssize_t stop)
{
    Py_ssize_t position = 0;
    PyObject *key;
    PyObject *value;
    while (PyDict_Next(tokens, &position, &key, &value)) {
        if (PyBytes_Check(key) && PyBytes_GET_SIZE(key) == stop - start &&
            memcmp(PyBytes_AS_STRING(key), data + start, stop - start) == 0) {
            return value;
        }
    }
    return NULL;
}

/* Append data[run_start:end] to the unchanged lines unless it is empty,
   and start the next run at `next`. Return -1 with an exception set when
   an allocation fails. */
static int
close_run(struct head *head, Py_ssize_t end, Py_ssize_t next)
{
    if (head->run_start < end) {
        PyObject *run = PyBytes_FromStringAndSize(
            (const char *)head->data + head->run_start, end - head->run_start);
        if (run == NULL) {
            return -1;
        }
        int failed = PyList_Append(head->unchanged_lines, run);
        Py_DECREF(run);
        if (failed) {
            return -1;
        }
    }
    head->run_start = next;
    return 0;
}

static int
append_via(struct head *head, Py_ssize_t start, Py_ssize_t stop)
{
    if (head->via == NULL) {
        head->via = PyList_New(0);
        if (head->via == NULL) {
            return -1;
        }
    }
    PyObject *value = PyBytes_FromStringAndSize(
        (const char *)head->data + start, stop - start);
    if (value == NULL) {
        return -1;
    }
    int failed = PyList_Append(head->via, value);
    Py_DECREF(value);
    return failed ? -1 : 0;
}

/* Return the offset of the colon after the field name at `start`, or -1.
   The name runs to the first colon and must be a token, which also rejects
   obs-fold, whitespace before the colon, and a line without a colon. */
static Py_ssize_t
find_colon(const struct head *head, Py_ssize_t start)
{
    Py_ssize_t i = start;
    while (i < head->limit && token_bytes[head->data[i]]) {
        i++;
    }
    if (i == start || i >= head->limit || head->data[i] != ':') {
        return -1;
    }
    return i;
}

/* Read the field line data[start:end], with its name's colon at `colon`
   and its CRLF at `end`. Return 1 when it was read, 0 when the head goes
   to llhttp, and -1 with an exception set when an allocation failed. */
static int
read_field(struct head *head, PyObject *tokens, Py_ssize_t start,
           Py_ssize_t colon, Py_ssize_t end)
{
    const unsigned char *data = head->data;
    enum field_kind kind = classify_name(data + start, colon - start);
    if (kind == FIELD_UNREAD) {
        return 0;
    }
    if (kind == FIELD_PLAIN) {
        return 1;
    }

    /* The value without the optional whitespace around it (RFC 9112
       section 5). */
    Py_ssize_t value_start = colon + 1;
    Py_ssize_t value_stop = end;
    while (value_start < value_stop &&
           (data[value_start] == ' ' || data[value_start] == '\t')) {
        value_start++;
    }
    while (value_stop > value_start &&
           (data[value_stop - 1] == ' ' || data[value_stop - 1] == '\t')) {
        value_stop--;
    }

    if (kind == FIELD_LENGTH) {
        if (head->length >= 0) {
            return 0;
        }
        head->length = read_length(data, value_start, value_stop);
        return head->length >= 0;
    }
    if (kind == FIELD_CONNECTION) {
        if (head->options != NULL) {
            return 0;
        }
        /* A strong reference: the allocations below may run the garbage
           collector, and with it code that could change the dict. */
        head->options =
            Py_XNewRef(find_options(tokens, data, value_start, value_stop));
        if (head->options == NULL) {
            return 0;
        }
    }
    else if (kind == FIELD_VIA) {
        if (append_via(head, value_start, value_stop) < 0) {
            return -1;
        }
    }
    /* The field is not forwarded: close the run of unchanged lines before
       it. */
    return close_run(head, start, end + 2) < 0 ? -1 : 1;
}

/* Read the status line and the fields up to the empty line. Return the
   offset after the head's final CRLF, 0 when the head goes to llhttp, or
   -1 with an exception set. */
static Py_ssize_t
read_lines(struct head *head, PyObject *tokens)
{
    Py_ssize_t end = find_line_end(head, 0);
    if (end < 0) {
        return 0;
    }
    head->status = read_status(head->data, end);
    if (head->status < 200 || head->status > 599) {
        return 0;
    }
    Py_ssize_t start = end + 2;
    for (;;) {
        if (start + 1 < head->limit && head->data[start] == '\r' &&
            head->data[start + 1] == '\n') {
            break; /* the empty line that ends the head */
        }
        /* The name's bytes are tokens, so only the value is scanned for
           the line's end. */
        Py_ssize_t colon = find_colon(head, start);
        if (colon < 0) {
            return 0;
        }
        end = find_line_end(head, colon + 1);
        if (end < 0) {
            return 0;
        }
        int read = read_field(head, tokens, start, colon, end);
        if (read <= 0) {
            return read;
        }
        start = end + 2;
    }
    if (close_run(head, start, start) < 0) {
        return -1;
    }
    return start + 2;
}

/* Return the body length that the proxy relays, or -1 when llhttp must
   read the head: a 204 with a Content-Length (the proxy drops the length),
   or no length where the body runs until the upstream closes. */
static long long
body_length(const struct head *head, int head_request)
{
    int no_body = head->status == 204 || head->status == 304;
    if (head->status == 204 && head->length >= 0) {
        return -1;
    }
    if (head_request || no_body) {
        return 0;
    }
    return head->length;
}

/* Put `item` at `index` of a new tuple, which then owns it. Return -1 when
   `item` is NULL, from a failed allocation. */
static int
set_item(PyObject *tuple, Py_ssize_t index, PyObject *item)
{
    if (item == NULL) {
        return -1;
    }
    PyTuple_SET_ITEM(tuple, index, item);
    return 0;
}

static PyObject *
new_length(long long length)
{
    return length >= 0 ? PyLong_FromLongLong(length) : Py_NewRef(Py_None);
}

/* Return the result tuple: (status, content_length or None, Connection
   options or None, unchanged_lines, via or None, body, body_length). */
static PyObject *
build_result(const struct head *head, Py_ssize_t head_end, Py_ssize_t size,
             long long relayed)
{
    PyObject *result = PyTuple_New(7);
    if (result == NULL) {
        return NULL;
    }
    PyObject *options = head->options != NULL ? head->options : Py_None;
    PyObject *via = head->via != NULL ? head->via : Py_None;
    /* && stops at the first failed allocation, so no call runs with an
       exception set, and the DECREF of the tuple releases the items set. */
    if (set_item(result, 0, PyLong_FromLong(head->status)) < 0 ||
        set_item(result, 1, new_length(head->length)) < 0 ||
        set_item(result, 2, Py_NewRef(options)) < 0 ||
        set_item(result, 3, Py_NewRef(head->unchanged_lines)) < 0 ||
        set_item(result, 4, Py_NewRef(via)) < 0 ||
        set_item(result, 5,
                 PyBytes_FromStringAndSize((const char *)head->data + head_end,
                                           size - head_end)) < 0 ||
        set_item(result, 6, PyLong_FromLongLong(relayed)) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static int
parse_arguments(PyObject *const *args, Py_ssize_t nargs, long long *max_head,
                int *head_request)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "read_head() takes 4 arguments (%zd given)", nargs);
        return -1;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "read_head() data must be bytes");
        return -1;
    }
    if (!PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "read_head() max_head must be int");
        return -1;
    }
    if (!PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "read_head() connection_tokens must be a dict");
        return -1;
    }
    int overflow;
    *max_head = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (*max_head == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow) {
        /* Beyond any bytes object's size, or below zero. */
        *max_head = overflow > 0 ? PY_SSIZE_T_MAX : -1;
    }
    *head_request = PyObject_IsTrue(args[2]);
    return *head_request < 0 ? -1 : 0;
}

PyDoc_STRVAR(read_head_doc,
"read_head(data, max_head, head_request, connection_tokens)\n"
"--\n\n"
"Read the response head at the start of `data`, or return None.\n\n"
"Return (status, content_length, options, unchanged_lines, via, body,\n"
"body_length); content_length, options and via are None when the head\n"
"has none. `connection_tokens` maps each Connection value read here to\n"
"its options (framing.COMMON_CONNECTION_TOKENS).");

static PyObject *
read_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long long max_head;
    int head_request;
    if (parse_arguments(args, nargs, &max_head, &head_request) < 0) {
        return NULL;
    }
    PyObject *data = args[0];
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(data);
    if (size < VERSION_SIZE || memcmp(bytes, VERSION, VERSION_SIZE) != 0) {
        Py_RETURN_NONE;
    }

    struct head head = {
        .data = bytes,
        .limit = max_head < size ? (Py_ssize_t)max_head : size,
        .length = -1,
    };
    head.unchanged_lines = PyList_New(0);
    if (head.unchanged_lines == NULL) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t head_end = read_lines(&head, args[3]);
    if (head_end > 0) {
        long long relayed = body_length(&head, head_request);
        if (relayed >= 0) {
            result = build_result(&head, head_end, size, relayed);
        }
        else {
            result = Py_NewRef(Py_None);
        }
    }
    else if (head_end == 0) {
        result = Py_NewRef(Py_None);
    }
    Py_DECREF(head.unchanged_lines);
    Py_XDECREF(head.via);
    Py_XDECREF(head.options);
    return result;
}

static PyMethodDef methods[] = {
    {"read_head", (PyCFunction)(void (*)(void))read_head, METH_FASTCALL,
     read_head_doc},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *module)
{
    (void)module;
    fill_tables();
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgproxy.proxy._response_head",
    .m_doc = "The response head reader of pgproxy/proxy/response_head.py, "
             "in C.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__response_head(void)
{
    return PyModuleDef_Init(&module_def);
}
