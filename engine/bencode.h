/* Bencoding (BEP 3): a zero-copy, non-recursive decoder and a bounded encoder.
 *
 * Decoding turns a buffer into a flat array of tokens in document order, as jsmn does for JSON:
 * a list or dict token is followed by the tokens of its elements (a dict's as key, value, key,
 * value, ...), and each token records the index one past its last descendant, so a caller skips
 * a whole subtree in O(1). Tokens point into the buffer; nothing is copied, no NUL terminator is
 * needed and no byte past the given length is read. Nesting uses an explicit bound, never the C
 * stack.
 *
 * The decoder is strict: it accepts exactly the canonical encoding, so that decoding and
 * encoding again gives the same bytes (signatures over bencoded data depend on this). It
 * rejects
 *   - integers with leading zeros ("i03e"), "i-0e", "i-e", "ie", and integers outside int64;
 *   - string lengths with leading zeros ("03:abc"), overflowing, or running past the buffer;
 *   - dict keys that are not strings, and dicts whose keys are not in strictly increasing
 *     byte order (BEP 3 requires sorted keys; unsorted dicts and duplicate keys are rejected,
 *     not repaired);
 *   - bytes after the top-level value, and a buffer that ends inside a value.
 *
 * Encoding goes through a bounded writer: the caller writes values in order and dict keys in
 * sorted order (the writer does not sort or check them); running out of room is sticky and
 * reported once, by dg_bencode_writer_finish().
 *
 * Thread safety: every function is reentrant; a writer belongs to one thread at a time. */
#ifndef DG_BENCODE_H
#define DG_BENCODE_H

#include <stddef.h>
#include <stdint.h>

enum dg_bencode_type {
    DG_BENCODE_INT = 1,
    DG_BENCODE_STR = 2,
    DG_BENCODE_LIST = 3,
    DG_BENCODE_DICT = 4,
};

/* One decoded value. All offsets are into the buffer given to dg_bencode_parse(). */
struct dg_bencode_token {
    enum dg_bencode_type type;
    /* Where the value's bytes are: for a string its payload (after "N:"); for an int, list or
     * dict the whole encoding, from 'i', 'l' or 'd' to the closing 'e'. */
    size_t off;
    size_t len;
    int64_t ival; /* DG_BENCODE_INT: the value; 0 otherwise */
    size_t count; /* list: number of items; dict: number of key-value pairs; 0 otherwise */
    size_t next;  /* index one past this token's last descendant (i + 1 for a scalar) */
};

/* Decodes one bencoded value that must fill @p buf exactly.
 * @param[in]  buf        the encoded bytes (no terminator needed).
 * @param[in]  len        length of @p buf.
 * @param[out] toks       array of @p max_toks tokens, filled in document order: toks[0] is the
 *                        top-level value. Valid only while @p buf is (tokens point into it).
 * @param[in]  max_toks   most tokens accepted (values > INT_MAX count as INT_MAX, so that every
 *                        index fits the int returned by the lookup helpers).
 * @param[in]  max_depth  most lists and dicts open at once; the top-level container counts as
 *                        depth 1, so 0 allows only a top-level integer or string.
 * @param[out] ntoks      number of tokens filled; 0 on failure.
 * @return 0; -EBADMSG for malformed or non-canonical input (see above), an empty buffer, or
 *         nesting deeper than @p max_depth; -E2BIG if the value needs more than @p max_toks
 *         tokens. On failure the contents of @p toks are unspecified. */
int dg_bencode_parse(const uint8_t *buf, size_t len, struct dg_bencode_token *toks, size_t max_toks,
                     unsigned max_depth, size_t *ntoks);

/* Finds a key in a dict. Keys are sorted (the parser enforces it), so the search stops at the
 * first key greater than @p key.
 * @param[in] buf    the buffer that was parsed.
 * @param[in] toks   tokens from dg_bencode_parse(); @p ntoks of them.
 * @param[in] dict   index of the dict token.
 * @param[in] key    key bytes (need not be NUL-terminated), @p keylen of them.
 * @return index of the value token for @p key; -ENOENT if the dict has no such key; -EBADMSG
 *         if toks[dict] is not a dict; -EINVAL if @p dict is not below @p ntoks. */
int dg_bencode_dict_find(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                         size_t dict, const void *key, size_t keylen);

/* Finds the @p n-th item (from 0) of a list, skipping earlier items' subtrees in O(1) each.
 * @return index of the item token; -ENOENT if the list has @p n items or fewer; -EBADMSG if
 *         toks[list] is not a list; -EINVAL if @p list is not below @p ntoks. */
int dg_bencode_list_item(const struct dg_bencode_token *toks, size_t ntoks, size_t list, size_t n);

/* Reads an integer token.
 * @param[out] out  the value.
 * @return 0; -EBADMSG if toks[i] is not an integer; -EINVAL if @p i is not below @p ntoks. */
int dg_bencode_get_int(const struct dg_bencode_token *toks, size_t ntoks, size_t i, int64_t *out);

/* Reads a string token.
 * @param[out] str  the payload, pointing into @p buf (valid only while @p buf is).
 * @param[out] len  payload length.
 * @return 0; -EBADMSG if toks[i] is not a string; -EINVAL if @p i is not below @p ntoks. */
int dg_bencode_get_str(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                       size_t i, const uint8_t **str, size_t *len);

/* The whole encoding of token @p i (for a string, "N:" included), e.g. to hash or re-send a
 * value verbatim (BEP 44 signs the bencoded `v` as it appeared).
 * @param[out] start  offset in the parsed buffer of the first byte.
 * @param[out] len    number of bytes.
 * @return 0; -EINVAL if @p i is not below @p ntoks. */
int dg_bencode_span(const struct dg_bencode_token *toks, size_t ntoks, size_t i, size_t *start,
                    size_t *len);

/* A bounded output buffer. Fill it with dg_bencode_writer_init(), never touch the fields while
 * writing; read the result with dg_bencode_writer_finish(). */
struct dg_bencode_writer {
    uint8_t *buf;
    size_t cap;   /* bytes available at buf */
    size_t len;   /* bytes the encoding needs so far (may exceed cap after an overflow) */
    int overflow; /* sticky: set once a write did not fit */
};

/* Starts writing into @p buf of @p cap bytes. @p buf may be NULL when @p cap is 0: nothing is
 * written and w->len counts the bytes an encoding needs. */
void dg_bencode_writer_init(struct dg_bencode_writer *w, uint8_t *buf, size_t cap);

/* Appends "i<v>e". */
void dg_bencode_put_int(struct dg_bencode_writer *w, int64_t v);

/* Appends "<len>:" and @p len bytes of @p s (@p s may be NULL when @p len is 0). */
void dg_bencode_put_str(struct dg_bencode_writer *w, const void *s, size_t len);

/* Appends a NUL-terminated string as a bencoded string (without the NUL). */
void dg_bencode_put_cstr(struct dg_bencode_writer *w, const char *s);

/* Appends @p len bytes that are already bencoded (one complete value), verbatim. */
void dg_bencode_put_raw(struct dg_bencode_writer *w, const void *raw, size_t len);

/* Opens a list ('l'); close it with dg_bencode_end(). */
void dg_bencode_begin_list(struct dg_bencode_writer *w);

/* Opens a dict ('d'); close it with dg_bencode_end(). Inside, write key (a string), value, key,
 * value, ... with keys in strictly increasing byte order: the writer neither sorts nor checks
 * them, and dg_bencode_parse() rejects a dict that is out of order. */
void dg_bencode_begin_dict(struct dg_bencode_writer *w);

/* Closes the innermost open list or dict ('e'). */
void dg_bencode_end(struct dg_bencode_writer *w);

/* Ends writing.
 * @return the number of bytes written at w->buf; -ENOBUFS if any write did not fit (the
 *         bytes at w->buf are then incomplete, and w->len tells how many were needed) or the
 *         length exceeds INT_MAX. */
int dg_bencode_writer_finish(const struct dg_bencode_writer *w);

#endif
