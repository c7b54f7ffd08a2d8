/*
 * pgproxy.proxy._request_head: the fast path of the request head check,
 * in C.
 *
 * Invariant: check_head() returns None for every head it is not sure
 * about, and for every other head the parts from which framing.py builds
 * exactly the RequestInfo that check_request_head_python() returns. It
 * never accepts a head that check_request_head_python() rejects: any doubt
 * returns None, and the Python check then runs and raises.
 *
 * It accepts only HTTP/1.0 and 1.1 with an origin-form target. The field
 * names must be tokens and the values free of controls. There is one valid
 * Host (or none in HTTP/1.0), at most one Content-Length of 1 to 18
 * digits, and at most one Connection field, whose value is a key of the
 * connection_tokens dict. Expect may only be 100-continue, and
 * Transfer-Encoding and Upgrade are absent. tests/proxy/test_request_head_c.py
 * compares the two checks on a seeded corpus of mutated heads.
 *
 * Memory: every offset is checked against the size of its bytes object,
 * and there are no fixed-size buffers. No Python code runs while the
 * fields are read (only exact bytes, tuples, lists and dicts are read), so
 * borrowed references stay valid until the first allocation. Before it,
 * the objects that go into the result are held by strong references, and
 * every path drops them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* Field kinds: what the check does with a field, by its name. */
enum field_kind {
    FIELD_PLAIN,       /* checked as a token name and a clean value */
    FIELD_HOST,
    FIELD_LENGTH,      /* Content-Length */
    FIELD_CONNECTION,
    FIELD_EXPECT,
    FIELD_IDEMPOTENCY, /* Idempotency-Key: only its presence is noted */
    FIELD_UNCHECKED,   /* Transfer-Encoding, Upgrade: the Python check runs */
};

/* The names that are not FIELD_PLAIN, in lower case, as compared in
   check_request_head_python(). */
static const struct {
    const char *lower;
    Py_ssize_t size;
    enum field_kind kind;
} SPECIAL_FIELDS[] = {
    {"host", 4, FIELD_HOST},
    {"content-length", 14, FIELD_LENGTH},
    {"connection", 10, FIELD_CONNECTION},
    {"expect", 6, FIELD_EXPECT},
    {"idempotency-key", 15, FIELD_IDEMPOTENCY},
    {"transfer-encoding", 17, FIELD_UNCHECKED},
    {"upgrade", 7, FIELD_UNCHECKED},
};
#define SPECIAL_COUNT (sizeof(SPECIAL_FIELDS) / sizeof(SPECIAL_FIELDS[0]))
/* "transfer-encoding" is the longest special name. */
#define MAX_SPECIAL_SIZE 17

/* parse_content_length() in framing.py reads up to 18 digits without a
   split, and they fit in a long long. */
#define MAX_LENGTH_DIGITS 18

/* 1 for the bytes a field value may hold: HTAB, SP, VCHAR and obs-text
   (RFC 9110 section 5.5), as framing._FIELD_VALUE_MAP allows. */
static unsigned char value_bytes[256];
/* 1 for tchar (RFC 9110 section 5.6.2), as framing.TOKEN_RE allows. */
static unsigned char token_bytes[256];
/* 1 for the bytes of an origin-form target: VCHAR except "#", as
   framing._TARGET_MAP allows. */
static unsigned char target_bytes[256];
/* 1 at the size of each name in SPECIAL_FIELDS. */
static unsigned char special_sizes[MAX_SPECIAL_SIZE + 1];

static void
fill_tables(void)
{
    for (int byte = 0; byte < 256; byte++) {
        value_bytes[byte] = byte == '\t' || (byte >= 0x20 && byte != 0x7F);
        token_bytes[byte] = (byte >= '0' && byte <= '9') ||
                            (byte >= 'a' && byte <= 'z') ||
                            (byte >= 'A' && byte <= 'Z') ||
                            (byte != 0 && strchr("!#$%&'*+-.^_`|~", byte));
        target_bytes[byte] = byte >= 0x21 && byte <= 0x7E && byte != '#';
    }
    for (size_t i = 0; i < SPECIAL_COUNT; i++) {
        special_sizes[SPECIAL_FIELDS[i].size] = 1;
    }
}

/* The fields of one head that the check reads. The pointers are borrowed
   from the headers list until take_references() makes them strong. */
struct fields {
    PyObject *host;    /* the one Host value, or NULL */
    PyObject *length;  /* the one Content-Length value, or NULL */
    PyObject *options; /* the connection_tokens value of the one
                          Connection field, or NULL */
    int expect_continue;
    int has_idempotency_key;
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

/* Return whether every byte of data[0:size] is in `table`. Words of SP,
   VCHAR and obs-text are skipped 8 bytes at a time, and the rest (HTAB
   included, which has_control_byte counts) is checked byte by byte. */
static int
all_in(const unsigned char *data, Py_ssize_t size, const unsigned char *table)
{
    Py_ssize_t i = 0;
    if (table == value_bytes) {
        while (size - i >= 8) {
            uint64_t word;
            memcpy(&word, data + i, 8); /* no alignment needed */
            if (has_control_byte(word)) {
                break;
            }
            i += 8;
        }
    }
    for (; i < size; i++) {
        if (!table[data[i]]) {
            return 0;
        }
    }
    return 1;
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

/* Return the kind of the field named `name`. `lowered` is nonzero when
   the name is the lower-case name from the `names` list, compared exactly
   as the Python check compares it, and zero for the name as received. */
static enum field_kind
classify_name(const unsigned char *name, Py_ssize_t size, int lowered)
{
    /* Most names have a size that no special name has. */
    if (size > MAX_SPECIAL_SIZE || !special_sizes[size]) {
        return FIELD_PLAIN;
    }
    for (size_t i = 0; i < SPECIAL_COUNT; i++) {
        if (SPECIAL_FIELDS[i].size != size) {
            continue;
        }
        int equal = lowered ? memcmp(name, SPECIAL_FIELDS[i].lower, size) == 0
                            : equals_lower(name, size, SPECIAL_FIELDS[i].lower);
        if (equal) {
            return SPECIAL_FIELDS[i].kind;
        }
    }
    return FIELD_PLAIN;
}

static int
is_blank(unsigned char byte)
{
    return byte == ' ' || byte == '\t';
}

/* Narrow data[*start:*stop] to the bytes inside its SP and HTAB, as
   bytes.strip(b" \t") does. */
static void
strip_blanks(const unsigned char *data, Py_ssize_t *start, Py_ssize_t *stop)
{
    while (*start < *stop && is_blank(data[*start])) {
        (*start)++;
    }
    while (*stop > *start && is_blank(data[*stop - 1])) {
        (*stop)--;
    }
}

/* Return whether a Host value is one that _set_host() in framing.py
   accepts with a host: not empty once stripped, and without "@", "/" or
   SP inside. */
static int
is_clean_host(PyObject *value)
{
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t start = 0;
    Py_ssize_t stop = PyBytes_GET_SIZE(value);
    strip_blanks(data, &start, &stop);
    if (start == stop) {
        return 0;
    }
    for (Py_ssize_t i = start; i < stop; i++) {
        if (data[i] == '@' || data[i] == '/' || data[i] == ' ') {
            return 0;
        }
    }
    return 1;
}

/* Return whether `value` is what parse_content_length() in framing.py
   reads without a split: 1 to 18 ASCII digits and nothing else. */
static int
is_plain_length(PyObject *value)
{
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t size = PyBytes_GET_SIZE(value);
    if (size == 0 || size > MAX_LENGTH_DIGITS) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        if (data[i] < '0' || data[i] > '9') {
            return 0;
        }
    }
    return 1;
}

/* Return whether an Expect value is 100-continue, the one expectation
   (RFC 9110 section 10.1.1), compared as the Python check compares it. */
static int
is_continue(PyObject *value)
{
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t start = 0;
    Py_ssize_t stop = PyBytes_GET_SIZE(value);
    strip_blanks(data, &start, &stop);
    return stop - start == 12 && equals_lower(data + start, 12, "100-continue");
}

/* Return the frozenset that `tokens` maps the Connection value `value` to,
   or NULL. The keys are compared by their bytes, so no __eq__ runs. */
static PyObject *
find_options(PyObject *tokens, PyObject *value)
{
    Py_ssize_t position = 0;
    PyObject *key;
    PyObject *options;
    Py_ssize_t size = PyBytes_GET_SIZE(value);
    while (PyDict_Next(tokens, &position, &key, &options)) {
        if (PyBytes_CheckExact(key) && PyBytes_GET_SIZE(key) == size &&
            memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(value), size) ==
                0) {
            return PyFrozenSet_CheckExact(options) ? options : NULL;
        }
    }
    return NULL;
}

/* Read one field for `fields`. Return 1 when it was read, and 0 when the
   Python check must decide the head. */
static int
read_field(struct fields *fields, PyObject *field, PyObject *names,
           Py_ssize_t index, PyObject *tokens)
{
    if (!PyTuple_CheckExact(field) || PyTuple_GET_SIZE(field) != 2) {
        return 0;
    }
    PyObject *name = PyTuple_GET_ITEM(field, 0);
    PyObject *value = PyTuple_GET_ITEM(field, 1);
    if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) {
        return 0;
    }
    const unsigned char *name_data =
        (const unsigned char *)PyBytes_AS_STRING(name);
    Py_ssize_t name_size = PyBytes_GET_SIZE(name);
    if (name_size == 0 || !all_in(name_data, name_size, token_bytes) ||
        !all_in((const unsigned char *)PyBytes_AS_STRING(value),
                PyBytes_GET_SIZE(value), value_bytes)) {
        return 0;
    }

    enum field_kind kind;
    if (names == Py_None) {
        kind = classify_name(name_data, name_size, 0);
    }
    else {
        /* The caller checked that `names` has an item at `index`. */
        PyObject *lower = PyList_GET_ITEM(names, index);
        if (!PyBytes_CheckExact(lower)) {
            return 0;
        }
        kind = classify_name((const unsigned char *)PyBytes_AS_STRING(lower),
                             PyBytes_GET_SIZE(lower), 1);
    }

    switch (kind) {
    case FIELD_PLAIN:
        return 1;
    case FIELD_HOST:
        if (fields->host != NULL || !is_clean_host(value)) {
            return 0;
        }
        fields->host = value;
        return 1;
    case FIELD_LENGTH:
        if (fields->length != NULL || !is_plain_length(value)) {
            return 0;
        }
        fields->length = value;
        return 1;
    case FIELD_CONNECTION:
        if (fields->options != NULL) {
            return 0;
        }
        fields->options = find_options(tokens, value);
        return fields->options != NULL;
    case FIELD_EXPECT:
        if (!is_continue(value)) {
            return 0;
        }
        fields->expect_continue = 1;
        return 1;
    case FIELD_IDEMPOTENCY:
        fields->has_idempotency_key = 1;
        return 1;
    case FIELD_UNCHECKED:
    default:
        return 0;
    }
}

/* Return 1 when every field was read, and 0 when the Python check must
   decide the head. */
static int
read_fields(struct fields *fields, PyObject *headers, PyObject *names,
            PyObject *tokens)
{
    Py_ssize_t count = PyList_GET_SIZE(headers);
    if (names != Py_None && PyList_GET_SIZE(names) < count) {
        return 0; /* the Python check raises IndexError */
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!read_field(fields, PyList_GET_ITEM(headers, i), names, i,
                        tokens)) {
            return 0;
        }
    }
    return 1;
}

/* Return whether `options` lists `option`. Iterating a frozenset runs no
   Python code, where a lookup could call an element's __eq__. Return -1
   with an exception set when the iterator cannot be allocated. */
static int
lists_option(PyObject *options, const char *option, Py_ssize_t size)
{
    PyObject *iterator = PyObject_GetIter(options);
    if (iterator == NULL) {
        return -1;
    }
    int found = 0;
    PyObject *item;
    while (!found && (item = PyIter_Next(iterator)) != NULL) {
        found = PyBytes_CheckExact(item) && PyBytes_GET_SIZE(item) == size &&
                memcmp(PyBytes_AS_STRING(item), option, size) == 0;
        Py_DECREF(item);
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : found;
}

/* Return whether the connection stays open after the request, as
   _keep_alive() in framing.py decides, or -1 with an exception set. */
static int
keeps_alive(PyObject *options, int version_11)
{
    if (options == NULL) {
        return version_11;
    }
    int close = lists_option(options, "close", 5);
    if (close != 0) {
        return close < 0 ? -1 : 0;
    }
    return version_11 ? 1 : lists_option(options, "keep-alive", 10);
}

/* Return the Host value without the SP and HTAB around it: `host` itself
   when there are none, as bytes.strip returns it, or b"" without a Host. */
static PyObject *
new_host_raw(PyObject *host)
{
    if (host == NULL) {
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(host);
    Py_ssize_t start = 0;
    Py_ssize_t stop = PyBytes_GET_SIZE(host);
    strip_blanks(data, &start, &stop);
    if (start == 0 && stop == PyBytes_GET_SIZE(host)) {
        return Py_NewRef(host);
    }
    return PyBytes_FromStringAndSize((const char *)data + start, stop - start);
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
new_length(PyObject *length)
{
    if (length == NULL) {
        return Py_NewRef(Py_None);
    }
    /* is_plain_length() checked 1 to 18 digits. */
    long long number = 0;
    const char *data = PyBytes_AS_STRING(length);
    for (Py_ssize_t i = 0; i < PyBytes_GET_SIZE(length); i++) {
        number = number * 10 + (data[i] - '0');
    }
    return PyLong_FromLongLong(number);
}

/* Return the result tuple: (target, host_raw, content_length or None,
   Connection options or None, keep_alive, expect_continue,
   has_idempotency_key). */
static PyObject *
build_result(PyObject *target, const struct fields *fields, int keep_alive,
             int version_11)
{
    PyObject *result = PyTuple_New(7);
    if (result == NULL) {
        return NULL;
    }
    PyObject *options = fields->options != NULL ? fields->options : Py_None;
    int expect_continue = fields->expect_continue && version_11;
    /* || stops at the first failed allocation, so no call runs with an
       exception set, and the DECREF of the tuple releases the items set. */
    if (set_item(result, 0, Py_NewRef(target)) < 0 ||
        set_item(result, 1, new_host_raw(fields->host)) < 0 ||
        set_item(result, 2, new_length(fields->length)) < 0 ||
        set_item(result, 3, Py_NewRef(options)) < 0 ||
        set_item(result, 4, PyBool_FromLong(keep_alive)) < 0 ||
        set_item(result, 5, PyBool_FromLong(expect_continue)) < 0 ||
        set_item(result, 6, PyBool_FromLong(fields->has_idempotency_key)) <
            0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* Return 1 for "1.1", 0 for "1.0", and -1 for any other version, which
   the Python check decides. */
static int
read_version(PyObject *version)
{
    if (!PyUnicode_CheckExact(version)) {
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(version, "1.1") == 0) {
        return 1;
    }
    if (PyUnicode_CompareWithASCIIString(version, "1.0") == 0) {
        return 0;
    }
    return -1;
}

static int
check_arguments(PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError,
                     "check_head() takes 5 arguments (%zd given)", nargs);
        return -1;
    }
    if (!PyDict_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "check_head() connection_tokens must be a dict");
        return -1;
    }
    return 0;
}

/* Take strong references to the objects the result is built from, so
   that code run by the garbage collector during an allocation cannot free
   them. */
static void
take_references(struct fields *fields)
{
    Py_XINCREF(fields->host);
    Py_XINCREF(fields->length);
    Py_XINCREF(fields->options);
}

static void
drop_references(struct fields *fields)
{
    Py_XDECREF(fields->host);
    Py_XDECREF(fields->length);
    Py_XDECREF(fields->options);
}

PyDoc_STRVAR(check_head_doc,
"check_head(target, version, headers, names, connection_tokens)\n"
"--\n\n"
"Check a clean, common request head, or return None.\n\n"
"Return (target, host_raw, content_length, options, keep_alive,\n"
"expect_continue, has_idempotency_key); content_length and options are\n"
"None when the head has none. None means the Python check must decide.\n"
"`names` is None or the lower-case names, parallel to `headers`.\n"
"`connection_tokens` maps each Connection value accepted here to its\n"
"options (framing.COMMON_CONNECTION_TOKENS).");

static PyObject *
check_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (check_arguments(args, nargs) < 0) {
        return NULL;
    }
    PyObject *target = args[0];
    PyObject *headers = args[2];
    PyObject *names = args[3];
    int version_11 = read_version(args[1]);
    if (version_11 < 0 || !PyBytes_CheckExact(target) ||
        !PyList_CheckExact(headers) ||
        (names != Py_None && !PyList_CheckExact(names))) {
        Py_RETURN_NONE;
    }
    const unsigned char *target_data =
        (const unsigned char *)PyBytes_AS_STRING(target);
    Py_ssize_t target_size = PyBytes_GET_SIZE(target);
    if (target_size == 0 || target_data[0] != '/' ||
        !all_in(target_data, target_size, target_bytes)) {
        Py_RETURN_NONE;
    }

    struct fields fields = {0};
    if (!read_fields(&fields, headers, names, args[4])) {
        Py_RETURN_NONE;
    }
    /* RFC 9112 section 3.2: HTTP/1.1 needs its Host. */
    if (fields.host == NULL && version_11) {
        Py_RETURN_NONE;
    }
    take_references(&fields);
    PyObject *result = NULL;
    int keep_alive = keeps_alive(fields.options, version_11);
    if (keep_alive >= 0) {
        result = build_result(target, &fields, keep_alive, version_11);
    }
    drop_references(&fields);
    return result;
}

static PyMethodDef methods[] = {
    {"check_head", (PyCFunction)(void (*)(void))check_head, METH_FASTCALL,
     check_head_doc},
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
    .m_name = "pgproxy.proxy._request_head",
    .m_doc = "The fast path of check_request_head in "
             "pgproxy/proxy/framing.py, in C.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__request_head(void)
{
    return PyModuleDef_Init(&module_def);
}
