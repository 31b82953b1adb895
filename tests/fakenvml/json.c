#include "json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Deep enough for any scenario; bounds recursion on malformed input. */
#define MAX_DEPTH 32

typedef struct {
    const char *text;
    size_t pos;
    char *err;
    size_t errlen;
    int failed;
} parser;

static void fail(parser *p, const char *fmt, ...) {
    if (p->failed) return;
    p->failed = 1;
    char msg[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* Report line and column: scenario files are edited by hand. */
    size_t line = 1, col = 1;
    for (size_t i = 0; i < p->pos && p->text[i]; i++) {
        if (p->text[i] == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    snprintf(p->err, p->errlen, "%s at line %zu column %zu", msg, line, col);
}

static void skip_ws(parser *p) {
    for (;;) {
        char c = p->text[p->pos];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') p->pos++;
        else return;
    }
}

static json_node *new_node(parser *p, json_type type) {
    json_node *n = calloc(1, sizeof *n);
    if (!n) fail(p, "out of memory");
    else n->type = type;
    return n;
}

static int append(parser *p, json_node *container, char *key, json_node *item) {
    size_t n = container->count + 1;
    json_node **items = realloc(container->items, n * sizeof *items);
    if (!items) {
        fail(p, "out of memory");
        return -1;
    }
    container->items = items;
    if (container->type == JSON_OBJECT) {
        char **keys = realloc(container->keys, n * sizeof *keys);
        if (!keys) {
            fail(p, "out of memory");
            return -1;
        }
        container->keys = keys;
        keys[n - 1] = key;
    }
    items[n - 1] = item;
    container->count = n;
    return 0;
}

static void put_utf8(char *out, size_t *len, unsigned cp) {
    if (cp < 0x80) {
        out[(*len)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*len)++] = (char)(0xC0 | (cp >> 6));
        out[(*len)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out[(*len)++] = (char)(0xE0 | (cp >> 12));
        out[(*len)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*len)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*len)++] = (char)(0xF0 | (cp >> 18));
        out[(*len)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*len)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*len)++] = (char)(0x80 | (cp & 0x3F));
    }
}

static int hex4(parser *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->text[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else {
            p->pos--;
            fail(p, "bad \\u escape");
            return -1;
        }
    }
    *out = v;
    return 0;
}

static char *parse_string(parser *p) {
    /* Caller has checked the opening quote. Escapes never lengthen the text, except
       \uXXXX (6 bytes) which becomes at most 4 bytes, so the raw length bounds the output. */
    p->pos++;
    size_t start = p->pos, end = start;
    while (p->text[end] && p->text[end] != '"') {
        if (p->text[end] == '\\' && p->text[end + 1]) end++;
        end++;
    }
    char *out = malloc(end - start + 1);
    if (!out) {
        fail(p, "out of memory");
        return NULL;
    }
    size_t len = 0;
    for (;;) {
        char c = p->text[p->pos];
        if (c == '\0') {
            fail(p, "unterminated string");
            break;
        }
        if ((unsigned char)c < 0x20) {
            fail(p, "control character in string");
            break;
        }
        p->pos++;
        if (c == '"') {
            out[len] = '\0';
            return out;
        }
        if (c != '\\') {
            out[len++] = c;
            continue;
        }
        char e = p->text[p->pos++];
        switch (e) {
        case '"': out[len++] = '"'; break;
        case '\\': out[len++] = '\\'; break;
        case '/': out[len++] = '/'; break;
        case 'b': out[len++] = '\b'; break;
        case 'f': out[len++] = '\f'; break;
        case 'n': out[len++] = '\n'; break;
        case 'r': out[len++] = '\r'; break;
        case 't': out[len++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (hex4(p, &cp) < 0) goto bad;
            if (cp >= 0xD800 && cp < 0xDC00 && p->text[p->pos] == '\\' &&
                p->text[p->pos + 1] == 'u') {
                unsigned lo;
                p->pos += 2;
                if (hex4(p, &lo) < 0) goto bad;
                if (lo >= 0xDC00 && lo < 0xE000)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(out, &len, cp);
            break;
        }
        default:
            p->pos--;
            fail(p, "bad escape in string");
            goto bad;
        }
    }
bad:
    free(out);
    return NULL;
}

static json_node *parse_value(parser *p, int depth);

static json_node *parse_container(parser *p, int depth, int is_object) {
    json_node *node = new_node(p, is_object ? JSON_OBJECT : JSON_ARRAY);
    if (!node) return NULL;
    char close = is_object ? '}' : ']';
    p->pos++;
    skip_ws(p);
    if (p->text[p->pos] == close) {
        p->pos++;
        return node;
    }
    for (;;) {
        char *key = NULL;
        skip_ws(p);
        if (is_object) {
            if (p->text[p->pos] != '"') {
                fail(p, "expected a string key");
                break;
            }
            key = parse_string(p);
            if (!key) break;
            skip_ws(p);
            if (p->text[p->pos] != ':') {
                free(key);
                fail(p, "expected ':'");
                break;
            }
            p->pos++;
        }
        json_node *item = parse_value(p, depth + 1);
        if (!item || append(p, node, key, item) < 0) {
            free(key);
            json_free(item);
            break;
        }
        skip_ws(p);
        char c = p->text[p->pos];
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == close) {
            p->pos++;
            return node;
        }
        fail(p, is_object ? "expected ',' or '}'" : "expected ',' or ']'");
        break;
    }
    json_free(node);
    return NULL;
}

static json_node *parse_value(parser *p, int depth) {
    if (depth > MAX_DEPTH) {
        fail(p, "nested too deeply");
        return NULL;
    }
    skip_ws(p);
    const char *s = p->text + p->pos;
    char c = *s;
    if (c == '{' || c == '[') return parse_container(p, depth, c == '{');
    if (c == '"') {
        char *str = parse_string(p);
        if (!str) return NULL;
        json_node *n = new_node(p, JSON_STRING);
        if (!n) {
            free(str);
            return NULL;
        }
        n->string = str;
        return n;
    }
    if (strncmp(s, "true", 4) == 0 || strncmp(s, "false", 5) == 0) {
        json_node *n = new_node(p, JSON_BOOL);
        if (n) n->boolean = (c == 't');
        p->pos += (c == 't') ? 4 : 5;
        return n;
    }
    if (strncmp(s, "null", 4) == 0) {
        p->pos += 4;
        return new_node(p, JSON_NULL);
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        char *end;
        double v = strtod(s, &end);
        if (end == s) {
            fail(p, "bad number");
            return NULL;
        }
        json_node *n = new_node(p, JSON_NUMBER);
        if (n) n->number = v;
        p->pos += (size_t)(end - s);
        return n;
    }
    fail(p, c ? "unexpected character '%c'" : "unexpected end of input", c);
    return NULL;
}

json_node *json_parse(const char *text, char *err, size_t errlen) {
    parser p = {text, 0, err, errlen, 0};
    json_node *root = parse_value(&p, 0);
    if (root) {
        skip_ws(&p);
        if (p.text[p.pos] != '\0') {
            fail(&p, "trailing characters after the document");
            json_free(root);
            root = NULL;
        }
    }
    return root;
}

void json_free(json_node *node) {
    if (!node) return;
    for (size_t i = 0; i < node->count; i++) {
        json_free(node->items[i]);
        if (node->keys) free(node->keys[i]);
    }
    free(node->items);
    free(node->keys);
    free(node->string);
    free(node);
}

const json_node *json_get(const json_node *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < obj->count; i++)
        if (strcmp(obj->keys[i], key) == 0) return obj->items[i];
    return NULL;
}
