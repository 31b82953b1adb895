/* A small JSON reader for fakenvml scenarios: parses a whole document into a tree. */
#ifndef FAKENVML_JSON_H
#define FAKENVML_JSON_H

#include <stddef.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json_node {
    json_type type;
    int boolean;
    double number;
    char *string;             /* JSON_STRING, NUL-terminated UTF-8 */
    size_t count;             /* items of an array or members of an object */
    struct json_node **items; /* array items or object values */
    char **keys;              /* object keys, parallel to items */
} json_node;

/* Parse `text`; on failure return NULL and describe the problem (with its offset) in `err`. */
json_node *json_parse(const char *text, char *err, size_t errlen);
void json_free(json_node *node);
/* The member `key` of an object, or NULL when absent or `obj` is not an object. */
const json_node *json_get(const json_node *obj, const char *key);

#endif
