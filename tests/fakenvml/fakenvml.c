/*
 * fakenvml: a stand-in libnvidia-ml.so.1 for tests. It implements the NVML entry points the
 * agent calls, with the struct layouts of the NVML 13 header, driven by the JSON scenario
 * named in FAKE_NVML_SCENARIO (read when the init refcount goes from 0 to 1). See README.md.
 *
 * Every entry point takes one mutex, so calls are serialized the way the real driver's lock
 * serializes them; nvmlEventSetWait_v2 releases it while blocked.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "json.h"

#define API __attribute__((visibility("default")))

/* ---- NVML types (layouts as in nvml.h / pynvml) ---- */

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct fake_device *nvmlDevice_t;
typedef struct fake_event_set *nvmlEventSet_t;
typedef struct fake_gpm_sample *nvmlGpmSample_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
#define NVML_MEMORY_V2_VERSION 0x02000028u

typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    int siVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

typedef struct {
    unsigned int version, isSupportedDevice;
} nvmlGpmSupport_t;

typedef struct {
    const char *shortName, *longName, *unit;
} nvmlGpmMetricInfo_t;

typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    nvmlGpmMetricInfo_t metricInfo;
} nvmlGpmMetric_t;

#define NVML_GPM_METRIC_MAX 477
typedef struct {
    unsigned int version, numMetrics;
    nvmlGpmSample_t sample1, sample2;
    nvmlGpmMetric_t metrics[NVML_GPM_METRIC_MAX];
} nvmlGpmMetricsGet_t;

_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t layout");
_Static_assert(sizeof(nvmlFieldValue_t) == 40, "nvmlFieldValue_t layout");
_Static_assert(sizeof(nvmlEventData_t) == 32, "nvmlEventData_t layout");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t layout");
_Static_assert(sizeof(nvmlGpmMetric_t) == 40, "nvmlGpmMetric_t layout");

enum {
    VT_DOUBLE = 0,
    VT_UINT = 1,
    VT_ULL = 3,
};

enum {
    FI_DEV_MEMORY_TEMP = 82,
    FI_DEV_NVLINK_LINK_COUNT = 91,
    FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138,
    FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139,
    FI_DEV_NVLINK_GET_SPEED = 164,
    FI_DEV_NVLINK_GET_STATE = 165,
    FI_DEV_NVLINK_GET_VERSION = 166,
};

#define EVENT_SINGLE_BIT_ECC 0x1ull
#define EVENT_DOUBLE_BIT_ECC 0x2ull
#define EVENT_PSTATE 0x4ull
#define EVENT_XID 0x8ull
#define EVENT_CLOCK 0x10ull
#define SUPPORTED_EVENTS \
    (EVENT_SINGLE_BIT_ECC | EVENT_DOUBLE_BIT_ECC | EVENT_PSTATE | EVENT_XID | EVENT_CLOCK)

/* ---- scenario ---- */

#define MAX_GPUS 64
#define MAX_LINKS 36
#define MAX_SWITCHES 16
#define MAX_EVENTS 256
#define MAX_UNSUPPORTED 64
#define MAX_NAMES 160

typedef enum {
    EV_XID,
    EV_GPU_LOST,
    EV_LINK_DOWN,
    EV_LINK_UP,
    EV_NVLINK_ERRORS,
    EV_ECC_ERRORS,
    EV_PCIE_REPLAYS,
    EV_CLOCKS_EVENT_REASONS,
} event_kind;

/* ECC counter slots: [error type][counter type], error 0 corrected / 1 uncorrected,
   counter 0 volatile / 1 aggregate, as NVML numbers them. */
typedef struct {
    double at_s;
    event_kind kind;
    int gpu, link;
    unsigned long long value;          /* xid, replay count, reasons */
    unsigned long long nvlink_err[5];  /* replay, recovery, crc_flit, crc_data, ecc_data */
    unsigned long long ecc[2][2];
} fake_event;

typedef struct {
    char driver_version[80];
    char nvml_version[80];
    int cuda_driver_version;
    int gpu_count;
    char name[96];
    unsigned int pci_device_id, pci_subsystem_id;
    char bus_ids[MAX_GPUS][32];
    double memory_total, memory_reserved, memory_used;
    double power_w, power_limit_w;
    double util_gpu, util_memory, temp_gpu, temp_memory;
    unsigned int sm_clock_mhz, memory_clock_mhz;
    double pcie_tx_kb_s, pcie_rx_kb_s;
    unsigned long long pcie_replays;
    unsigned long long ecc[2][2];
    unsigned int remapped[4]; /* correctable, uncorrectable, pending, failure */
    unsigned long long clocks_event_reasons;
    int gpm_supported;
    double sm_occupancy, tensor_active;
    int link_count, link_version;
    double link_speed_mb_s;
    int remote_type; /* NVML_NVLINK_DEVICE_TYPE_*: 0 gpu, 1 ibmnpu, 2 switch */
    int switch_count;
    char switch_bus_ids[MAX_SWITCHES][32];
    int link_switch[MAX_LINKS];
    double tx_kib_s, rx_kib_s;
    nvmlReturn_t init_error;
    int n_unsupported;
    char unsupported[MAX_UNSUPPORTED][64];
    int n_unsupported_fields;
    unsigned int unsupported_fields[MAX_UNSUPPORTED];
    int n_failures;
    struct {
        char function[64];
        int gpu; /* -1: every GPU */
        double from_s;
        nvmlReturn_t code;
    } failures[MAX_UNSUPPORTED];
    int n_events;
    fake_event events[MAX_EVENTS];
} scenario;

struct fake_device {
    int index;
};

struct fake_event_set {
    unsigned generation;
    unsigned long long masks[MAX_GPUS];
    unsigned char delivered[MAX_EVENTS];
    struct fake_event_set *next;
};

#define GPM_MAGIC 0x47504d53u
struct fake_gpm_sample {
    unsigned magic;
    unsigned generation;
    int gpu; /* -1 until taken */
    double t;
    double tx_kib[MAX_LINKS], rx_kib[MAX_LINKS];
};

/* ---- global state, guarded by `mu` ---- */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv; /* on CLOCK_MONOTONIC; signalled by advance and shutdown */
static scenario sc;
static struct fake_device devices[MAX_GPUS];
static int refcount;
static unsigned generation;
static double epoch_mono_s, offset_s;
static int frozen;
static struct fake_event_set *event_sets;
static const char *call_names[MAX_NAMES];
static unsigned long long call_counts[MAX_NAMES];

__attribute__((constructor)) static void fakenvml_setup(void) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&cv, &attr);
    pthread_condattr_destroy(&attr);
    for (int i = 0; i < MAX_GPUS; i++) devices[i].index = i;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Scenario time: seconds since init, plus what tests added with fakenvml_advance. */
static double now_s(void) {
    return (frozen ? 0.0 : mono_s() - epoch_mono_s) + offset_s;
}

static void count_call(const char *fn) {
    for (int i = 0; i < MAX_NAMES; i++) {
        if (!call_names[i]) {
            call_names[i] = fn;
            call_counts[i] = 1;
            return;
        }
        if (strcmp(call_names[i], fn) == 0) {
            call_counts[i]++;
            return;
        }
    }
}

static int is_unsupported(const char *fn) {
    for (int i = 0; i < sc.n_unsupported; i++)
        if (strcmp(sc.unsupported[i], fn) == 0) return 1;
    return 0;
}

/* The error a scenario injects into `fn` on `gpu` (-1 for system calls) at time `t`, or
   success. Function "*" stands for every per-device call. */
static nvmlReturn_t injected_failure(const char *fn, int gpu, double t) {
    for (int i = 0; i < sc.n_failures; i++) {
        const char *f = sc.failures[i].function;
        int matches = strcmp(f, fn) == 0 || (gpu >= 0 && strcmp(f, "*") == 0);
        if (matches && (sc.failures[i].gpu < 0 || sc.failures[i].gpu == gpu) &&
            t >= sc.failures[i].from_s)
            return sc.failures[i].code;
    }
    return NVML_SUCCESS;
}

/* ---- time-dependent device state ---- */

/* Deterministic per-GPU spread in -5..5 so GPUs do not all read the same value. */
static int jitter(int gpu) {
    return (int)((unsigned)(gpu * 37) % 11u) - 5;
}

static double clamp(double v, double lo, double hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

/* Rates scale by 1% per GPU index: documented in README.md so tests can predict them. */
static double rate_scale(int gpu) {
    return 1.0 + 0.01 * gpu;
}

static int gpu_lost(int gpu, double t) {
    for (int i = 0; i < sc.n_events && sc.events[i].at_s <= t; i++)
        if (sc.events[i].kind == EV_GPU_LOST && sc.events[i].gpu == gpu) return 1;
    return 0;
}

/* Seconds in [0, t] during which the link was up; counters only move while it is. */
static double link_active_s(int gpu, int link, double t, int *up_now) {
    int up = 1;
    double since = 0.0, active = 0.0;
    for (int i = 0; i < sc.n_events && sc.events[i].at_s <= t; i++) {
        const fake_event *e = &sc.events[i];
        if (e->gpu != gpu || e->link != link) continue;
        if (e->kind == EV_LINK_DOWN && up) {
            active += e->at_s - since;
            up = 0;
        } else if (e->kind == EV_LINK_UP && !up) {
            since = e->at_s;
            up = 1;
        }
    }
    if (up) active += t - since;
    if (up_now) *up_now = up;
    return active;
}

static int link_up(int gpu, int link, double t) {
    int up;
    link_active_s(gpu, link, t, &up);
    return up;
}

/* Cumulative payload KiB; dir 0 = tx, 1 = rx. The offset stands for traffic since boot. */
static double link_kib(int gpu, int link, int dir, double t) {
    double rate = (dir == 0 ? sc.tx_kib_s : sc.rx_kib_s) * rate_scale(gpu);
    double offset = (double)(gpu + 1) * 1e9 + (double)link * 1e7 + (double)dir * 5e6;
    return floor(offset + rate * link_active_s(gpu, link, t, NULL));
}

static unsigned long long nvlink_errors(int gpu, int link, int counter, double t) {
    unsigned long long n = 0;
    for (int i = 0; i < sc.n_events && sc.events[i].at_s <= t; i++) {
        const fake_event *e = &sc.events[i];
        if (e->kind == EV_NVLINK_ERRORS && e->gpu == gpu && e->link == link)
            n += e->nvlink_err[counter];
    }
    return n;
}

static unsigned long long ecc_errors(int gpu, int type, int counter, double t) {
    unsigned long long n = sc.ecc[type][counter];
    for (int i = 0; i < sc.n_events && sc.events[i].at_s <= t; i++) {
        const fake_event *e = &sc.events[i];
        if (e->kind == EV_ECC_ERRORS && e->gpu == gpu) n += e->ecc[type][counter];
    }
    return n;
}

static unsigned long long pcie_replays(int gpu, double t) {
    unsigned long long n = sc.pcie_replays;
    for (int i = 0; i < sc.n_events && sc.events[i].at_s <= t; i++)
        if (sc.events[i].kind == EV_PCIE_REPLAYS && sc.events[i].gpu == gpu)
            n += sc.events[i].value;
    return n;
}

static unsigned long long clocks_event_reasons(int gpu, double t) {
    unsigned long long r = sc.clocks_event_reasons;
    for (int i = 0; i < sc.n_events && sc.events[i].at_s <= t; i++)
        if (sc.events[i].kind == EV_CLOCKS_EVENT_REASONS && sc.events[i].gpu == gpu)
            r = sc.events[i].value;
    return r;
}

static double power_w(int gpu) {
    return clamp(sc.power_w + 5.0 * jitter(gpu), 0.0, sc.power_limit_w);
}

static double percent(double base, int gpu) {
    return clamp(base + jitter(gpu), 0.0, 100.0);
}

static double memory_used(int gpu) {
    return clamp(sc.memory_used + (double)gpu * 268435456.0, 0.0,
                 sc.memory_total - sc.memory_reserved);
}

/* NVML numbers NVLink versions with nvmlNvlinkVersion_t: 4.0 is 6. */
static unsigned nvlink_version_enum(int major) {
    static const unsigned table[] = {0, 1, 2, 4, 6, 7, 8};
    return (major >= 1 && major <= 6) ? table[major] : 0;
}

static const char *remote_bus_id(int gpu, int link) {
    if (sc.remote_type == 2) return sc.switch_bus_ids[sc.link_switch[link]];
    /* GPU-to-GPU bridges pair neighbours (0-1, 2-3, ...). */
    int peer = gpu ^ 1;
    return sc.bus_ids[peer < sc.gpu_count ? peer : gpu];
}

static void fill_pci(nvmlPciInfo_t *pci, const char *bus_id) {
    unsigned domain = 0, bus = 0, dev = 0, fn = 0;
    memset(pci, 0, sizeof *pci);
    sscanf(bus_id, "%x:%x:%x.%x", &domain, &bus, &dev, &fn);
    snprintf(pci->busId, sizeof pci->busId, "%s", bus_id);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04x:%02x:%02x.%x", domain & 0xffff,
             bus, dev, fn);
    pci->domain = domain;
    pci->bus = bus;
    pci->device = dev;
    pci->pciDeviceId = sc.pci_device_id;
    pci->pciSubSystemId = sc.pci_subsystem_id;
}

/* ---- scenario loading ---- */

static int load_error(char *err, size_t errlen, const char *fmt, const char *what) {
    snprintf(err, errlen, fmt, what);
    return -1;
}

/* Unknown keys are errors: a misspelt key would otherwise silently test nothing. */
static int check_keys(const json_node *obj, const char *const *allowed, const char *where,
                      char *err, size_t errlen) {
    if (!obj || obj->type != JSON_OBJECT)
        return load_error(err, errlen, "%s must be an object", where);
    for (size_t i = 0; i < obj->count; i++) {
        int ok = 0;
        for (const char *const *a = allowed; *a; a++)
            if (strcmp(obj->keys[i], *a) == 0) ok = 1;
        if (!ok) {
            snprintf(err, errlen, "%s: unknown key \"%s\"", where, obj->keys[i]);
            return -1;
        }
    }
    return 0;
}

static int get_number(const json_node *obj, const char *key, double *out, char *err,
                      size_t errlen) {
    const json_node *n = json_get(obj, key);
    if (!n) return 0;
    if (n->type == JSON_BOOL) {
        *out = n->boolean;
        return 0;
    }
    if (n->type != JSON_NUMBER) return load_error(err, errlen, "\"%s\" must be a number", key);
    *out = n->number;
    return 0;
}

static int get_ull(const json_node *obj, const char *key, unsigned long long *out, char *err,
                   size_t errlen) {
    double v = (double)*out;
    if (get_number(obj, key, &v, err, errlen) < 0) return -1;
    if (v < 0) return load_error(err, errlen, "\"%s\" must not be negative", key);
    *out = (unsigned long long)v;
    return 0;
}

static int get_int(const json_node *obj, const char *key, int *out, char *err, size_t errlen) {
    double v = *out;
    if (get_number(obj, key, &v, err, errlen) < 0) return -1;
    *out = (int)v;
    return 0;
}

static int get_string(const json_node *obj, const char *key, char *out, size_t size, char *err,
                      size_t errlen) {
    const json_node *n = json_get(obj, key);
    if (!n) return 0;
    if (n->type != JSON_STRING) return load_error(err, errlen, "\"%s\" must be a string", key);
    snprintf(out, size, "%s", n->string);
    return 0;
}

static int exported(const char *name) {
    Dl_info info;
    if (!dladdr((void *)&exported, &info) || !info.dli_fname) return 1;
    void *self = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!self) return 1;
    int found = dlsym(self, name) != NULL;
    dlclose(self);
    return found;
}

static int parse_event(const json_node *ev, fake_event *e, char *err, size_t errlen) {
    static const char *const keys[] = {
        "at_s", "type", "gpu", "link", "xid", "count", "reasons", "replay", "recovery",
        "crc_flit", "crc_data", "ecc_data", "corrected_volatile", "uncorrected_volatile",
        "corrected_aggregate", "uncorrected_aggregate", NULL};
    static const struct {
        const char *name;
        event_kind kind;
    } kinds[] = {
        {"xid", EV_XID},
        {"gpu_lost", EV_GPU_LOST},
        {"link_down", EV_LINK_DOWN},
        {"link_up", EV_LINK_UP},
        {"nvlink_errors", EV_NVLINK_ERRORS},
        {"ecc_errors", EV_ECC_ERRORS},
        {"pcie_replays", EV_PCIE_REPLAYS},
        {"clocks_event_reasons", EV_CLOCKS_EVENT_REASONS},
    };
    if (check_keys(ev, keys, "event", err, errlen) < 0) return -1;
    const json_node *type = json_get(ev, "type");
    if (!type || type->type != JSON_STRING)
        return load_error(err, errlen, "%s", "event: \"type\" must be a string");
    size_t k = 0;
    while (k < sizeof kinds / sizeof kinds[0] && strcmp(kinds[k].name, type->string) != 0) k++;
    if (k == sizeof kinds / sizeof kinds[0])
        return load_error(err, errlen, "event: unknown type \"%s\"", type->string);
    memset(e, 0, sizeof *e);
    e->kind = kinds[k].kind;
    e->gpu = -1;
    e->link = -1;
    if (get_number(ev, "at_s", &e->at_s, err, errlen) < 0) return -1;
    if (get_int(ev, "gpu", &e->gpu, err, errlen) < 0) return -1;
    if (get_int(ev, "link", &e->link, err, errlen) < 0) return -1;
    if (e->gpu < 0 || e->gpu >= sc.gpu_count)
        return load_error(err, errlen, "event %s: \"gpu\" is missing or out of range",
                          type->string);
    int needs_link = e->kind == EV_LINK_DOWN || e->kind == EV_LINK_UP ||
                     e->kind == EV_NVLINK_ERRORS;
    if (needs_link && (e->link < 0 || e->link >= sc.link_count))
        return load_error(err, errlen, "event %s: \"link\" is missing or out of range",
                          type->string);
    if (e->kind == EV_XID && !json_get(ev, "xid"))
        return load_error(err, errlen, "%s", "event xid: \"xid\" is required");
    static const char *const nvlink_keys[] = {"replay", "recovery", "crc_flit", "crc_data",
                                              "ecc_data"};
    for (int i = 0; i < 5; i++)
        if (get_ull(ev, nvlink_keys[i], &e->nvlink_err[i], err, errlen) < 0) return -1;
    if (get_ull(ev, "corrected_volatile", &e->ecc[0][0], err, errlen) < 0 ||
        get_ull(ev, "corrected_aggregate", &e->ecc[0][1], err, errlen) < 0 ||
        get_ull(ev, "uncorrected_volatile", &e->ecc[1][0], err, errlen) < 0 ||
        get_ull(ev, "uncorrected_aggregate", &e->ecc[1][1], err, errlen) < 0)
        return -1;
    const char *value_key = e->kind == EV_XID ? "xid"
                            : e->kind == EV_PCIE_REPLAYS ? "count"
                                                         : "reasons";
    return get_ull(ev, value_key, &e->value, err, errlen);
}

static int parse_nvlink(const json_node *nv, char *err, size_t errlen) {
    static const char *const keys[] = {"count",         "version",      "speed_mb_per_s",
                                       "remote",        "switch_pci_bus_ids", "link_switch",
                                       "tx_kib_per_s",  "rx_kib_per_s", NULL};
    if (check_keys(nv, keys, "gpus.nvlink", err, errlen) < 0) return -1;
    if (get_int(nv, "count", &sc.link_count, err, errlen) < 0 ||
        get_int(nv, "version", &sc.link_version, err, errlen) < 0 ||
        get_number(nv, "speed_mb_per_s", &sc.link_speed_mb_s, err, errlen) < 0 ||
        get_number(nv, "tx_kib_per_s", &sc.tx_kib_s, err, errlen) < 0 ||
        get_number(nv, "rx_kib_per_s", &sc.rx_kib_s, err, errlen) < 0)
        return -1;
    if (sc.link_count < 0 || sc.link_count > MAX_LINKS)
        return load_error(err, errlen, "%s", "gpus.nvlink.count out of range 0-36");
    char remote[16] = "switch";
    if (get_string(nv, "remote", remote, sizeof remote, err, errlen) < 0) return -1;
    if (strcmp(remote, "gpu") == 0) sc.remote_type = 0;
    else if (strcmp(remote, "ibmnpu") == 0) sc.remote_type = 1;
    else if (strcmp(remote, "switch") == 0) sc.remote_type = 2;
    else return load_error(err, errlen, "gpus.nvlink.remote: unknown \"%s\"", remote);
    const json_node *sw = json_get(nv, "switch_pci_bus_ids");
    if (sw) {
        if (sw->type != JSON_ARRAY || sw->count == 0 || sw->count > MAX_SWITCHES)
            return load_error(err, errlen, "%s",
                              "gpus.nvlink.switch_pci_bus_ids must be a list of 1-16 ids");
        sc.switch_count = (int)sw->count;
        for (size_t i = 0; i < sw->count; i++) {
            if (sw->items[i]->type != JSON_STRING)
                return load_error(err, errlen, "%s", "switch_pci_bus_ids: ids are strings");
            snprintf(sc.switch_bus_ids[i], sizeof sc.switch_bus_ids[i], "%s",
                     sw->items[i]->string);
        }
    }
    /* HGX boards spread each GPU's links evenly over the switches. */
    for (int l = 0; l < sc.link_count; l++) sc.link_switch[l] = l * sc.switch_count / sc.link_count;
    const json_node *ls = json_get(nv, "link_switch");
    if (ls) {
        if (ls->type != JSON_ARRAY || (int)ls->count != sc.link_count)
            return load_error(err, errlen, "%s",
                              "gpus.nvlink.link_switch needs one entry per link");
        for (int l = 0; l < sc.link_count; l++) {
            int s = (int)ls->items[l]->number;
            if (ls->items[l]->type != JSON_NUMBER || s < 0 || s >= sc.switch_count)
                return load_error(err, errlen, "%s", "gpus.nvlink.link_switch: bad switch index");
            sc.link_switch[l] = s;
        }
    }
    return 0;
}

static int parse_gpus(const json_node *g, char *err, size_t errlen) {
    static const char *const keys[] = {
        "count", "name", "pci_device_id", "pci_subsystem_id", "pci_bus_ids",
        "memory_total_bytes", "memory_reserved_bytes", "memory_used_bytes", "power_watts",
        "power_limit_watts", "utilization_gpu_percent", "utilization_memory_percent",
        "temperature_gpu_c", "temperature_memory_c", "sm_clock_mhz", "memory_clock_mhz",
        "pcie_tx_kb_per_s", "pcie_rx_kb_per_s", "pcie_replays", "ecc", "remapped_rows",
        "clocks_event_reasons", "gpm_supported", "sm_occupancy_percent",
        "tensor_active_percent", "nvlink", NULL};
    if (check_keys(g, keys, "gpus", err, errlen) < 0) return -1;
    double sm = sc.sm_clock_mhz, mem = sc.memory_clock_mhz, dev_id = sc.pci_device_id,
           sub_id = sc.pci_subsystem_id, gpm = sc.gpm_supported;
    if (get_int(g, "count", &sc.gpu_count, err, errlen) < 0 ||
        get_string(g, "name", sc.name, sizeof sc.name, err, errlen) < 0 ||
        get_number(g, "pci_device_id", &dev_id, err, errlen) < 0 ||
        get_number(g, "pci_subsystem_id", &sub_id, err, errlen) < 0 ||
        get_number(g, "memory_total_bytes", &sc.memory_total, err, errlen) < 0 ||
        get_number(g, "memory_reserved_bytes", &sc.memory_reserved, err, errlen) < 0 ||
        get_number(g, "memory_used_bytes", &sc.memory_used, err, errlen) < 0 ||
        get_number(g, "power_watts", &sc.power_w, err, errlen) < 0 ||
        get_number(g, "power_limit_watts", &sc.power_limit_w, err, errlen) < 0 ||
        get_number(g, "utilization_gpu_percent", &sc.util_gpu, err, errlen) < 0 ||
        get_number(g, "utilization_memory_percent", &sc.util_memory, err, errlen) < 0 ||
        get_number(g, "temperature_gpu_c", &sc.temp_gpu, err, errlen) < 0 ||
        get_number(g, "temperature_memory_c", &sc.temp_memory, err, errlen) < 0 ||
        get_number(g, "sm_clock_mhz", &sm, err, errlen) < 0 ||
        get_number(g, "memory_clock_mhz", &mem, err, errlen) < 0 ||
        get_number(g, "pcie_tx_kb_per_s", &sc.pcie_tx_kb_s, err, errlen) < 0 ||
        get_number(g, "pcie_rx_kb_per_s", &sc.pcie_rx_kb_s, err, errlen) < 0 ||
        get_ull(g, "pcie_replays", &sc.pcie_replays, err, errlen) < 0 ||
        get_ull(g, "clocks_event_reasons", &sc.clocks_event_reasons, err, errlen) < 0 ||
        get_number(g, "gpm_supported", &gpm, err, errlen) < 0 ||
        get_number(g, "sm_occupancy_percent", &sc.sm_occupancy, err, errlen) < 0 ||
        get_number(g, "tensor_active_percent", &sc.tensor_active, err, errlen) < 0)
        return -1;
    sc.sm_clock_mhz = (unsigned)sm;
    sc.memory_clock_mhz = (unsigned)mem;
    sc.pci_device_id = (unsigned)dev_id;
    sc.pci_subsystem_id = (unsigned)sub_id;
    sc.gpm_supported = gpm != 0.0;
    if (sc.gpu_count < 0 || sc.gpu_count > MAX_GPUS)
        return load_error(err, errlen, "%s", "gpus.count out of range 0-64");
    /* Default bus ids follow the HGX H100/H200 baseboard layout. */
    static const unsigned hgx_bus[] = {0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb};
    for (int i = 0; i < sc.gpu_count; i++)
        snprintf(sc.bus_ids[i], sizeof sc.bus_ids[i], "00000000:%02X:00.0",
                 i < 8 ? hgx_bus[i] : (unsigned)(0x100 - sc.gpu_count + i) & 0xff);
    const json_node *ids = json_get(g, "pci_bus_ids");
    if (ids) {
        if (ids->type != JSON_ARRAY || (int)ids->count != sc.gpu_count)
            return load_error(err, errlen, "%s", "gpus.pci_bus_ids needs one id per GPU");
        for (int i = 0; i < sc.gpu_count; i++) {
            if (ids->items[i]->type != JSON_STRING)
                return load_error(err, errlen, "%s", "gpus.pci_bus_ids: ids are strings");
            snprintf(sc.bus_ids[i], sizeof sc.bus_ids[i], "%s", ids->items[i]->string);
        }
    }
    const json_node *ecc = json_get(g, "ecc");
    if (ecc) {
        static const char *const ecc_keys[] = {"corrected_volatile", "uncorrected_volatile",
                                               "corrected_aggregate", "uncorrected_aggregate",
                                               NULL};
        if (check_keys(ecc, ecc_keys, "gpus.ecc", err, errlen) < 0 ||
            get_ull(ecc, "corrected_volatile", &sc.ecc[0][0], err, errlen) < 0 ||
            get_ull(ecc, "corrected_aggregate", &sc.ecc[0][1], err, errlen) < 0 ||
            get_ull(ecc, "uncorrected_volatile", &sc.ecc[1][0], err, errlen) < 0 ||
            get_ull(ecc, "uncorrected_aggregate", &sc.ecc[1][1], err, errlen) < 0)
            return -1;
    }
    const json_node *rr = json_get(g, "remapped_rows");
    if (rr) {
        static const char *const rr_keys[] = {"correctable", "uncorrectable", "pending",
                                              "failure", NULL};
        for (int i = 0; i < 4; i++) {
            double v = 0;
            if ((i == 0 && check_keys(rr, rr_keys, "gpus.remapped_rows", err, errlen) < 0) ||
                get_number(rr, rr_keys[i], &v, err, errlen) < 0)
                return -1;
            sc.remapped[i] = (unsigned)v;
        }
    }
    const json_node *nv = json_get(g, "nvlink");
    return nv ? parse_nvlink(nv, err, errlen) : 0;
}

static const struct {
    const char *name;
    nvmlReturn_t code;
} error_names[] = {
    {"driver_not_loaded", NVML_ERROR_DRIVER_NOT_LOADED},
    {"no_permission", NVML_ERROR_NO_PERMISSION},
    {"lib_rm_version_mismatch", NVML_ERROR_LIB_RM_VERSION_MISMATCH},
    {"invalid_argument", NVML_ERROR_INVALID_ARGUMENT},
    {"not_found", NVML_ERROR_NOT_FOUND},
    {"timeout", NVML_ERROR_TIMEOUT},
    {"memory", NVML_ERROR_MEMORY},
    {"unknown", NVML_ERROR_UNKNOWN},
};

static int error_code(const char *name, nvmlReturn_t *code) {
    for (size_t i = 0; i < sizeof error_names / sizeof error_names[0]; i++) {
        if (strcmp(error_names[i].name, name) == 0) {
            *code = error_names[i].code;
            return 0;
        }
    }
    return -1;
}

static int parse_failures(const json_node *list, char *err, size_t errlen) {
    static const char *const keys[] = {"function", "error", "gpu", "from_s", NULL};
    if (list->type != JSON_ARRAY || list->count > MAX_UNSUPPORTED)
        return load_error(err, errlen, "%s", "failures must be a list of at most 64 entries");
    for (size_t i = 0; i < list->count; i++) {
        const json_node *f = list->items[i];
        char error[32] = "";
        int n = sc.n_failures;
        sc.failures[n].gpu = -1;
        if (check_keys(f, keys, "failures[]", err, errlen) < 0 ||
            get_string(f, "function", sc.failures[n].function, sizeof sc.failures[n].function,
                       err, errlen) < 0 ||
            get_string(f, "error", error, sizeof error, err, errlen) < 0 ||
            get_int(f, "gpu", &sc.failures[n].gpu, err, errlen) < 0 ||
            get_number(f, "from_s", &sc.failures[n].from_s, err, errlen) < 0)
            return -1;
        const char *fn = sc.failures[n].function;
        if (strcmp(fn, "*") != 0 && (strncmp(fn, "nvml", 4) != 0 || !exported(fn)))
            return load_error(err, errlen, "failures: \"%s\" is not an entry point of fakenvml",
                              sc.failures[n].function);
        if (error_code(error, &sc.failures[n].code) < 0)
            return load_error(err, errlen, "failures: unknown error \"%s\"", error);
        sc.n_failures++;
    }
    return 0;
}

static void scenario_defaults(void) {
    memset(&sc, 0, sizeof sc);
    snprintf(sc.driver_version, sizeof sc.driver_version, "570.124.06");
    snprintf(sc.nvml_version, sizeof sc.nvml_version, "12.570.124.06");
    sc.cuda_driver_version = 12080;
    snprintf(sc.name, sizeof sc.name, "NVIDIA H200");
    sc.pci_device_id = 0x233510de;
    sc.pci_subsystem_id = 0x18be10de;
    sc.memory_total = 150754820096.0;
    sc.memory_reserved = 530579456.0;
    sc.power_limit_w = 700;
    sc.sm_clock_mhz = 1980;
    sc.memory_clock_mhz = 3201;
    sc.gpm_supported = 1;
    sc.link_version = 4;
    sc.link_speed_mb_s = 26562;
    sc.remote_type = 2;
    sc.switch_count = 1;
    snprintf(sc.switch_bus_ids[0], sizeof sc.switch_bus_ids[0], "00000000:05:00.0");
}

static int parse_scenario(const json_node *root, char *err, size_t errlen) {
    static const char *const keys[] = {"description",  "driver_version",     "nvml_version",
                                       "cuda_driver_version", "init_error", "gpus",
                                       "unsupported",  "unsupported_fields", "failures",
                                       "events",       NULL};
    scenario_defaults();
    if (check_keys(root, keys, "scenario", err, errlen) < 0) return -1;
    if (get_string(root, "driver_version", sc.driver_version, sizeof sc.driver_version, err,
                   errlen) < 0 ||
        get_string(root, "nvml_version", sc.nvml_version, sizeof sc.nvml_version, err,
                   errlen) < 0 ||
        get_int(root, "cuda_driver_version", &sc.cuda_driver_version, err, errlen) < 0)
        return -1;
    char init_error[32] = "";
    if (get_string(root, "init_error", init_error, sizeof init_error, err, errlen) < 0)
        return -1;
    if (init_error[0] && error_code(init_error, &sc.init_error) < 0)
        return load_error(err, errlen, "init_error: unknown \"%s\"", init_error);
    const json_node *gpus = json_get(root, "gpus");
    if (gpus && parse_gpus(gpus, err, errlen) < 0) return -1;

    const json_node *un = json_get(root, "unsupported");
    if (un) {
        if (un->type != JSON_ARRAY || un->count > MAX_UNSUPPORTED)
            return load_error(err, errlen, "%s", "unsupported must be a list of function names");
        for (size_t i = 0; i < un->count; i++) {
            const json_node *n = un->items[i];
            if (n->type != JSON_STRING || strncmp(n->string, "nvml", 4) != 0 ||
                !exported(n->string))
                return load_error(err, errlen,
                                  "unsupported: \"%s\" is not an entry point of fakenvml",
                                  n->type == JSON_STRING ? n->string : "?");
            snprintf(sc.unsupported[sc.n_unsupported++], sizeof sc.unsupported[0], "%s",
                     n->string);
        }
    }
    const json_node *uf = json_get(root, "unsupported_fields");
    if (uf) {
        if (uf->type != JSON_ARRAY || uf->count > MAX_UNSUPPORTED)
            return load_error(err, errlen, "%s", "unsupported_fields must be a list of field ids");
        for (size_t i = 0; i < uf->count; i++)
            sc.unsupported_fields[sc.n_unsupported_fields++] = (unsigned)uf->items[i]->number;
    }
    const json_node *failures = json_get(root, "failures");
    if (failures && parse_failures(failures, err, errlen) < 0) return -1;
    const json_node *evs = json_get(root, "events");
    if (evs) {
        if (evs->type != JSON_ARRAY || evs->count > MAX_EVENTS)
            return load_error(err, errlen, "%s", "events must be a list of at most 256 events");
        for (size_t i = 0; i < evs->count; i++) {
            fake_event e;
            if (parse_event(evs->items[i], &e, err, errlen) < 0) return -1;
            /* Keep events sorted by time (stable), so scans can stop at the first future one. */
            int j = sc.n_events++;
            while (j > 0 && sc.events[j - 1].at_s > e.at_s) {
                sc.events[j] = sc.events[j - 1];
                j--;
            }
            sc.events[j] = e;
        }
    }
    return 0;
}

static nvmlReturn_t load_scenario(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    if (!path || !*path) {
        fprintf(stderr, "fakenvml: FAKE_NVML_SCENARIO is not set; reporting no driver\n");
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fakenvml: cannot open scenario %s: %s\n", path, strerror(errno));
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 16384;
            char *grown = realloc(text, cap);
            if (!grown) {
                free(text);
                fclose(f);
                return NVML_ERROR_MEMORY;
            }
            text = grown;
        }
        size_t n = fread(text + len, 1, 4096, f);
        len += n;
        if (n == 0) break;
    }
    fclose(f);
    text[len] = '\0';
    char err[256] = "";
    json_node *root = json_parse(text, err, sizeof err);
    free(text);
    int rc = root ? parse_scenario(root, err, sizeof err) : -1;
    json_free(root);
    if (rc < 0) {
        fprintf(stderr, "fakenvml: scenario %s: %s\n", path, err);
        return NVML_ERROR_UNKNOWN;
    }
    return NVML_SUCCESS;
}

/* ---- call prologue / epilogue ---- */

typedef struct {
    nvmlReturn_t ret;
    int gpu;
    double t;
} call_t;

/* What a call returns before doing its work: injected failures, then "not supported". */
static nvmlReturn_t scenario_verdict(const char *fn, int gpu, double t) {
    nvmlReturn_t ret = injected_failure(fn, gpu, t);
    if (ret == NVML_SUCCESS && is_unsupported(fn)) ret = NVML_ERROR_NOT_SUPPORTED;
    return ret;
}

static call_t begin(const char *fn) {
    pthread_mutex_lock(&mu);
    count_call(fn);
    call_t c = {NVML_SUCCESS, -1, 0.0};
    if (refcount == 0) {
        c.ret = NVML_ERROR_UNINITIALIZED;
        return c;
    }
    c.t = now_s();
    c.ret = scenario_verdict(fn, -1, c.t);
    return c;
}

static int device_index(nvmlDevice_t dev) {
    if (dev < devices || dev >= devices + sc.gpu_count) return -1;
    return (int)(dev - devices);
}

/* Device calls: a lost GPU answers GPU_IS_LOST to everything, supported or not. */
static call_t begin_device(const char *fn, nvmlDevice_t dev) {
    pthread_mutex_lock(&mu);
    count_call(fn);
    call_t c = {NVML_SUCCESS, -1, 0.0};
    if (refcount == 0) {
        c.ret = NVML_ERROR_UNINITIALIZED;
        return c;
    }
    c.t = now_s();
    c.gpu = device_index(dev);
    if (c.gpu < 0) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    else if (gpu_lost(c.gpu, c.t)) c.ret = NVML_ERROR_GPU_IS_LOST;
    else c.ret = scenario_verdict(fn, c.gpu, c.t);
    return c;
}

static call_t begin_link(const char *fn, nvmlDevice_t dev, unsigned link) {
    call_t c = begin_device(fn, dev);
    if (c.ret == NVML_SUCCESS && link >= (unsigned)sc.link_count)
        c.ret = NVML_ERROR_INVALID_ARGUMENT;
    return c;
}

static nvmlReturn_t end(const call_t *c) {
    pthread_mutex_unlock(&mu);
    return c->ret;
}

#define NEED(ptr)                                                  \
    do {                                                           \
        if (c.ret == NVML_SUCCESS && !(ptr)) c.ret = NVML_ERROR_INVALID_ARGUMENT; \
    } while (0)

static nvmlReturn_t copy_string(char *out, unsigned len, const char *value) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

/* ---- init, system ---- */

API nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    count_call(__func__);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (refcount == 0) {
        ret = load_scenario();
        if (ret == NVML_SUCCESS && sc.init_error) ret = sc.init_error;
        if (ret == NVML_SUCCESS) {
            generation++;
            epoch_mono_s = mono_s();
            offset_s = 0.0;
        }
    }
    if (ret == NVML_SUCCESS) refcount++;
    pthread_mutex_unlock(&mu);
    return ret;
}

API nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
API nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

API nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&mu);
    count_call(__func__);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (refcount == 0) ret = NVML_ERROR_UNINITIALIZED;
    else if (--refcount == 0) pthread_cond_broadcast(&cv); /* wake waiters: they fail */
    pthread_mutex_unlock(&mu);
    return ret;
}

API const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    call_t c = begin(__func__);
    if (c.ret == NVML_SUCCESS) c.ret = copy_string(version, length, sc.driver_version);
    return end(&c);
}

API nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    call_t c = begin(__func__);
    if (c.ret == NVML_SUCCESS) c.ret = copy_string(version, length, sc.nvml_version);
    return end(&c);
}

API nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    call_t c = begin(__func__);
    NEED(version);
    if (c.ret == NVML_SUCCESS) *version = sc.cuda_driver_version;
    return end(&c);
}

API nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    call_t c = begin(__func__);
    NEED(version);
    if (c.ret == NVML_SUCCESS) *version = sc.cuda_driver_version;
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    call_t c = begin(__func__);
    NEED(count);
    if (c.ret == NVML_SUCCESS) *count = (unsigned)sc.gpu_count;
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    call_t c = begin(__func__);
    NEED(device);
    if (c.ret == NVML_SUCCESS && index >= (unsigned)sc.gpu_count)
        c.ret = NVML_ERROR_INVALID_ARGUMENT;
    /* As the driver does for a GPU that fell off the bus before the handle was asked for. */
    if (c.ret == NVML_SUCCESS && gpu_lost((int)index, c.t)) c.ret = NVML_ERROR_GPU_IS_LOST;
    if (c.ret == NVML_SUCCESS) *device = &devices[index];
    return end(&c);
}

/* ---- device identity ---- */

API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    call_t c = begin_device(__func__, device);
    NEED(index);
    if (c.ret == NVML_SUCCESS) *index = (unsigned)c.gpu;
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    call_t c = begin_device(__func__, device);
    if (c.ret == NVML_SUCCESS) c.ret = copy_string(name, length, sc.name);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    call_t c = begin_device(__func__, device);
    if (c.ret == NVML_SUCCESS) {
        /* splitmix64 of the index: stable across runs, distinct per GPU. */
        unsigned long long z = (unsigned long long)(c.gpu + 1) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        char text[64];
        snprintf(text, sizeof text, "GPU-%08llx-%04llx-%04llx-%04llx-%012llx", z >> 32,
                 (z >> 16) & 0xffff, z & 0xffff, (z >> 48) ^ 0x4000, (z * 31) & 0xffffffffffffull);
        c.ret = copy_string(uuid, length, text);
    }
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    call_t c = begin_device(__func__, device);
    NEED(pci);
    if (c.ret == NVML_SUCCESS) fill_pci(pci, sc.bus_ids[c.gpu]);
    return end(&c);
}

/* ---- device readings ---- */

API nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util) {
    call_t c = begin_device(__func__, device);
    NEED(util);
    if (c.ret == NVML_SUCCESS) {
        util->gpu = (unsigned)percent(sc.util_gpu, c.gpu);
        util->memory = (unsigned)percent(sc.util_memory, c.gpu);
    }
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    call_t c = begin_device(__func__, device);
    NEED(memory);
    if (c.ret == NVML_SUCCESS) {
        /* v1 counts the driver's reservation as used. */
        memory->total = (unsigned long long)sc.memory_total;
        memory->used = (unsigned long long)(memory_used(c.gpu) + sc.memory_reserved);
        memory->free = memory->total - memory->used;
    }
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    call_t c = begin_device(__func__, device);
    NEED(memory);
    if (c.ret == NVML_SUCCESS && memory->version != NVML_MEMORY_V2_VERSION)
        c.ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (c.ret == NVML_SUCCESS) {
        memory->total = (unsigned long long)sc.memory_total;
        memory->reserved = (unsigned long long)sc.memory_reserved;
        memory->used = (unsigned long long)memory_used(c.gpu);
        memory->free = memory->total - memory->reserved - memory->used;
    }
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *milliwatts) {
    call_t c = begin_device(__func__, device);
    NEED(milliwatts);
    if (c.ret == NVML_SUCCESS) *milliwatts = (unsigned)(power_w(c.gpu) * 1000.0);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device,
                                                     unsigned long long *millijoules) {
    call_t c = begin_device(__func__, device);
    NEED(millijoules);
    if (c.ret == NVML_SUCCESS)
        /* The offset stands for energy used before the scenario started. */
        *millijoules =
            (unsigned long long)((double)(c.gpu + 1) * 1e8 + power_w(c.gpu) * 1000.0 * c.t);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    call_t c = begin_device(__func__, device);
    NEED(limit);
    if (c.ret == NVML_SUCCESS) *limit = (unsigned)(sc.power_limit_w * 1000.0);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    call_t c = begin_device(__func__, device);
    NEED(limit);
    if (c.ret == NVML_SUCCESS) *limit = (unsigned)(sc.power_limit_w * 1000.0);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensor,
                                          unsigned int *temp) {
    call_t c = begin_device(__func__, device);
    NEED(temp);
    if (c.ret == NVML_SUCCESS && sensor != 0) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS) *temp = (unsigned)(sc.temp_gpu + jitter(c.gpu));
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, unsigned int type,
                                        unsigned int *mhz) {
    call_t c = begin_device(__func__, device);
    NEED(mhz);
    if (c.ret == NVML_SUCCESS) {
        switch (type) {
        case 0: /* graphics */
        case 1: *mhz = sc.sm_clock_mhz; break;
        case 2: *mhz = sc.memory_clock_mhz; break;
        case 3: *mhz = sc.sm_clock_mhz * 17 / 20; break; /* video */
        default: c.ret = NVML_ERROR_INVALID_ARGUMENT;
        }
    }
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t device, unsigned int counter,
                                             unsigned int *kb_per_s) {
    call_t c = begin_device(__func__, device);
    NEED(kb_per_s);
    if (c.ret == NVML_SUCCESS && counter > 1) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS)
        *kb_per_s =
            (unsigned)((counter == 0 ? sc.pcie_tx_kb_s : sc.pcie_rx_kb_s) * rate_scale(c.gpu));
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t device, unsigned int *value) {
    call_t c = begin_device(__func__, device);
    NEED(value);
    if (c.ret == NVML_SUCCESS) *value = (unsigned)pcie_replays(c.gpu, c.t);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int error_type,
                                             unsigned int counter_type,
                                             unsigned long long *count) {
    call_t c = begin_device(__func__, device);
    NEED(count);
    if (c.ret == NVML_SUCCESS && (error_type > 1 || counter_type > 1))
        c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS) *count = ecc_errors(c.gpu, (int)error_type, (int)counter_type, c.t);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *correctable,
                                           unsigned int *uncorrectable, unsigned int *pending,
                                           unsigned int *failure) {
    call_t c = begin_device(__func__, device);
    NEED(correctable && uncorrectable && pending && failure);
    if (c.ret == NVML_SUCCESS) {
        *correctable = sc.remapped[0];
        *uncorrectable = sc.remapped[1];
        *pending = sc.remapped[2];
        *failure = sc.remapped[3];
    }
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                        unsigned long long *reasons) {
    call_t c = begin_device(__func__, device);
    NEED(reasons);
    if (c.ret == NVML_SUCCESS) *reasons = clocks_event_reasons(c.gpu, c.t);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                           unsigned long long *reasons) {
    call_t c = begin_device(__func__, device);
    NEED(reasons);
    if (c.ret == NVML_SUCCESS) *reasons = clocks_event_reasons(c.gpu, c.t);
    return end(&c);
}

/* ---- field values ---- */

static int field_unsupported(unsigned id) {
    for (int i = 0; i < sc.n_unsupported_fields; i++)
        if (sc.unsupported_fields[i] == id) return 1;
    return 0;
}

static void set_uint(nvmlFieldValue_t *v, unsigned value) {
    v->valueType = VT_UINT;
    v->value.ullVal = 0;
    v->value.uiVal = value;
}

static void read_field(int gpu, double t, nvmlFieldValue_t *v) {
    unsigned link = v->scopeId;
    int all_links = link == UINT_MAX;
    int is_link_field = v->fieldId == FI_DEV_NVLINK_THROUGHPUT_DATA_TX ||
                        v->fieldId == FI_DEV_NVLINK_THROUGHPUT_DATA_RX ||
                        v->fieldId == FI_DEV_NVLINK_GET_SPEED ||
                        v->fieldId == FI_DEV_NVLINK_GET_STATE ||
                        v->fieldId == FI_DEV_NVLINK_GET_VERSION;
    v->nvmlReturn = NVML_SUCCESS;
    v->latencyUsec = 2;
    if (field_unsupported(v->fieldId)) {
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        return;
    }
    if (is_link_field && !all_links && link >= (unsigned)sc.link_count) {
        v->nvmlReturn = NVML_ERROR_INVALID_ARGUMENT;
        return;
    }
    switch (v->fieldId) {
    case FI_DEV_MEMORY_TEMP:
        set_uint(v, (unsigned)(sc.temp_memory + jitter(gpu)));
        break;
    case FI_DEV_NVLINK_LINK_COUNT:
        set_uint(v, (unsigned)sc.link_count);
        break;
    case FI_DEV_NVLINK_THROUGHPUT_DATA_TX:
    case FI_DEV_NVLINK_THROUGHPUT_DATA_RX: {
        int dir = v->fieldId == FI_DEV_NVLINK_THROUGHPUT_DATA_RX;
        double kib = 0;
        for (int l = 0; l < sc.link_count; l++)
            if (all_links || (unsigned)l == link) kib += link_kib(gpu, l, dir, t);
        v->valueType = VT_ULL;
        v->value.ullVal = (unsigned long long)kib;
        break;
    }
    case FI_DEV_NVLINK_GET_SPEED:
        if (all_links) v->nvmlReturn = NVML_ERROR_INVALID_ARGUMENT;
        else set_uint(v, link_up(gpu, (int)link, t) ? (unsigned)sc.link_speed_mb_s : 0);
        break;
    case FI_DEV_NVLINK_GET_STATE:
        if (all_links) v->nvmlReturn = NVML_ERROR_INVALID_ARGUMENT;
        else set_uint(v, (unsigned)link_up(gpu, (int)link, t));
        break;
    case FI_DEV_NVLINK_GET_VERSION:
        set_uint(v, nvlink_version_enum(sc.link_version));
        break;
    default:
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
    }
}

API nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int count,
                                          nvmlFieldValue_t *values) {
    call_t c = begin_device(__func__, device);
    NEED(values && count > 0);
    if (c.ret == NVML_SUCCESS) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long stamp_us = (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
        for (int i = 0; i < count; i++) {
            values[i].timestamp = stamp_us;
            read_field(c.gpu, c.t, &values[i]);
        }
    }
    return end(&c);
}

/* ---- NVLink ---- */

API nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link,
                                          unsigned int *is_active) {
    call_t c = begin_link(__func__, device, link);
    NEED(is_active);
    if (c.ret == NVML_SUCCESS) *is_active = (unsigned)link_up(c.gpu, (int)link, c.t);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetNvLinkVersion(nvmlDevice_t device, unsigned int link,
                                            unsigned int *version) {
    call_t c = begin_link(__func__, device, link);
    NEED(version);
    if (c.ret == NVML_SUCCESS) *version = nvlink_version_enum(sc.link_version);
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetNvLinkCapability(nvmlDevice_t device, unsigned int link,
                                               unsigned int capability, unsigned int *result) {
    call_t c = begin_link(__func__, device, link);
    NEED(result);
    if (c.ret == NVML_SUCCESS && capability > 5) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS) *result = capability == 3 ? 0 : 1; /* no SLI bridge */
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link,
                                                     nvmlPciInfo_t *pci) {
    call_t c = begin_link(__func__, device, link);
    NEED(pci);
    if (c.ret == NVML_SUCCESS) fill_pci(pci, remote_bus_id(c.gpu, (int)link));
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetNvLinkRemoteDeviceType(nvmlDevice_t device, unsigned int link,
                                                     unsigned int *type) {
    call_t c = begin_link(__func__, device, link);
    NEED(type);
    if (c.ret == NVML_SUCCESS) *type = (unsigned)sc.remote_type;
    return end(&c);
}

API nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t device, unsigned int link,
                                                 unsigned int counter,
                                                 unsigned long long *value) {
    call_t c = begin_link(__func__, device, link);
    NEED(value);
    if (c.ret == NVML_SUCCESS && counter > 4) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS) *value = nvlink_errors(c.gpu, (int)link, (int)counter, c.t);
    return end(&c);
}

/* ---- events ---- */

static int live_set(const struct fake_event_set *set) {
    for (const struct fake_event_set *s = event_sets; s; s = s->next)
        if (s == set) return set->generation == generation;
    return 0;
}

API nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    call_t c = begin(__func__);
    NEED(set);
    if (c.ret == NVML_SUCCESS) {
        struct fake_event_set *s = calloc(1, sizeof *s);
        if (!s) {
            c.ret = NVML_ERROR_MEMORY;
        } else {
            s->generation = generation;
            s->next = event_sets;
            event_sets = s;
            *set = s;
        }
    }
    return end(&c);
}

API nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    pthread_mutex_lock(&mu);
    count_call(__func__);
    nvmlReturn_t ret = NVML_ERROR_INVALID_ARGUMENT;
    for (struct fake_event_set **p = &event_sets; *p; p = &(*p)->next) {
        if (*p == set) {
            *p = set->next;
            free(set);
            ret = NVML_SUCCESS;
            break;
        }
    }
    pthread_mutex_unlock(&mu);
    return ret;
}

API nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device,
                                                  unsigned long long *types) {
    call_t c = begin_device(__func__, device);
    NEED(types);
    if (c.ret == NVML_SUCCESS) *types = SUPPORTED_EVENTS;
    return end(&c);
}

API nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                          nvmlEventSet_t set) {
    call_t c = begin_device(__func__, device);
    if (c.ret == NVML_SUCCESS && !live_set(set)) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS && (types & ~SUPPORTED_EVENTS)) c.ret = NVML_ERROR_NOT_SUPPORTED;
    if (c.ret == NVML_SUCCESS) set->masks[c.gpu] |= types;
    return end(&c);
}

/* The earliest event due by `t` that this set has not delivered; else -1, with the time
   of the next one still to come in *next_at. */
static int due_event(const struct fake_event_set *set, double t, double *next_at) {
    *next_at = INFINITY;
    for (int i = 0; i < sc.n_events; i++) {
        const fake_event *e = &sc.events[i];
        if (e->kind != EV_XID || set->delivered[i] || !(set->masks[e->gpu] & EVENT_XID)) continue;
        if (e->at_s <= t) return i;
        *next_at = e->at_s;
        return -1;
    }
    return -1;
}

API nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                     unsigned int timeout_ms) {
    pthread_mutex_lock(&mu);
    count_call(__func__);
    nvmlReturn_t ret;
    double deadline = mono_s() + timeout_ms / 1000.0;
    for (;;) {
        if (refcount == 0) {
            ret = NVML_ERROR_UNINITIALIZED;
            break;
        }
        if (!live_set(set) || !data) {
            ret = NVML_ERROR_INVALID_ARGUMENT;
            break;
        }
        double t = now_s(), next_at;
        int i = due_event(set, t, &next_at);
        if (i >= 0) {
            set->delivered[i] = 1;
            memset(data, 0, sizeof *data);
            data->device = &devices[sc.events[i].gpu];
            data->eventType = EVENT_XID;
            data->eventData = sc.events[i].value;
            ret = NVML_SUCCESS;
            break;
        }
        double real = mono_s();
        if (real >= deadline) {
            ret = NVML_ERROR_TIMEOUT;
            break;
        }
        double wake = deadline;
        if (!frozen && next_at - t < wake - real) wake = real + (next_at - t);
        struct timespec ts;
        ts.tv_sec = (time_t)wake;
        ts.tv_nsec = (long)((wake - (double)ts.tv_sec) * 1e9);
        pthread_cond_timedwait(&cv, &mu, &ts);
    }
    pthread_mutex_unlock(&mu);
    return ret;
}

/* ---- GPM ---- */

static struct fake_gpm_sample *gpm_sample(nvmlGpmSample_t s) {
    return (s && s->magic == GPM_MAGIC) ? s : NULL;
}

API nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t device, nvmlGpmSupport_t *support) {
    call_t c = begin_device(__func__, device);
    NEED(support);
    if (c.ret == NVML_SUCCESS && support->version != 1)
        c.ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (c.ret == NVML_SUCCESS) support->isSupportedDevice = (unsigned)sc.gpm_supported;
    return end(&c);
}

API nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample) {
    call_t c = begin(__func__);
    NEED(sample);
    if (c.ret == NVML_SUCCESS) {
        struct fake_gpm_sample *s = calloc(1, sizeof *s);
        if (!s) {
            c.ret = NVML_ERROR_MEMORY;
        } else {
            s->magic = GPM_MAGIC;
            s->gpu = -1;
            *sample = s;
        }
    }
    return end(&c);
}

API nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample) {
    call_t c = begin(__func__);
    struct fake_gpm_sample *s = gpm_sample(sample);
    if (c.ret == NVML_SUCCESS && !s) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS) {
        s->magic = 0;
        free(s);
    }
    return end(&c);
}

API nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t device, nvmlGpmSample_t sample) {
    call_t c = begin_device(__func__, device);
    struct fake_gpm_sample *s = gpm_sample(sample);
    if (c.ret == NVML_SUCCESS && !s) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS && !sc.gpm_supported) c.ret = NVML_ERROR_NOT_SUPPORTED;
    if (c.ret == NVML_SUCCESS) {
        s->gpu = c.gpu;
        s->generation = generation;
        s->t = c.t;
        for (int l = 0; l < sc.link_count; l++) {
            s->tx_kib[l] = link_kib(c.gpu, l, 0, c.t);
            s->rx_kib[l] = link_kib(c.gpu, l, 1, c.t);
        }
    }
    return end(&c);
}

static nvmlReturn_t gpm_metric(const struct fake_gpm_sample *a, const struct fake_gpm_sample *b,
                               unsigned id, double *value) {
    double dt = b->t - a->t;
    int gpu = b->gpu;
    if (id == 1 || id == 2) *value = percent(sc.util_gpu, gpu); /* graphics / SM util */
    else if (id == 3) *value = percent(sc.sm_occupancy, gpu);
    else if (id == 5) *value = percent(sc.tensor_active, gpu);
    else if (id >= 60 && id < 62 + 2u * (unsigned)sc.link_count) {
        /* 60/61 all links; 62 + 2n / 63 + 2n link n; even ids receive, odd transmit. */
        int rx = (id % 2) == 0;
        double kib = 0;
        for (int l = 0; l < sc.link_count; l++) {
            if (id >= 62 && (unsigned)l != (id - 62) / 2) continue;
            kib += rx ? b->rx_kib[l] - a->rx_kib[l] : b->tx_kib[l] - a->tx_kib[l];
        }
        *value = kib / 1024.0 / dt; /* MiB/s */
    } else return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *m) {
    call_t c = begin(__func__);
    NEED(m);
    if (c.ret == NVML_SUCCESS && m->version != 1) c.ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    const struct fake_gpm_sample *a = c.ret == NVML_SUCCESS ? gpm_sample(m->sample1) : NULL;
    const struct fake_gpm_sample *b = c.ret == NVML_SUCCESS ? gpm_sample(m->sample2) : NULL;
    if (c.ret == NVML_SUCCESS &&
        (!a || !b || a->gpu < 0 || a->gpu != b->gpu || a->generation != generation ||
         b->generation != generation || m->numMetrics > NVML_GPM_METRIC_MAX))
        c.ret = NVML_ERROR_INVALID_ARGUMENT;
    /* The fake insists on the documented 100 ms minimum, to catch samples paired too early. */
    if (c.ret == NVML_SUCCESS && b->t - a->t < 0.1) c.ret = NVML_ERROR_INVALID_ARGUMENT;
    if (c.ret == NVML_SUCCESS) {
        for (unsigned i = 0; i < m->numMetrics; i++) {
            nvmlGpmMetric_t *metric = &m->metrics[i];
            metric->value = 0;
            metric->nvmlReturn = gpm_metric(a, b, metric->metricId, &metric->value);
            metric->metricInfo.shortName = NULL;
            metric->metricInfo.longName = NULL;
            metric->metricInfo.unit = NULL;
        }
    }
    return end(&c);
}

/* ---- test controls ---- */

/* Move scenario time forward: counters, events and waits see `seconds` more. */
API void fakenvml_advance(double seconds) {
    pthread_mutex_lock(&mu);
    offset_s += seconds;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

/* Stop (1) or restart (0) the monotonic part of scenario time, so only advance moves it. */
API void fakenvml_freeze(int freeze) {
    pthread_mutex_lock(&mu);
    if (freeze && !frozen) {
        offset_s = now_s();
        frozen = 1;
    } else if (!freeze && frozen) {
        epoch_mono_s = mono_s();
        frozen = 0;
    }
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

API double fakenvml_now(void) {
    pthread_mutex_lock(&mu);
    double t = now_s();
    pthread_mutex_unlock(&mu);
    return t;
}

API int fakenvml_refcount(void) {
    pthread_mutex_lock(&mu);
    int n = refcount;
    pthread_mutex_unlock(&mu);
    return n;
}

API unsigned long long fakenvml_call_count(const char *fn) {
    unsigned long long n = 0;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_NAMES && call_names[i]; i++)
        if (fn && strcmp(call_names[i], fn) == 0) n = call_counts[i];
    pthread_mutex_unlock(&mu);
    return n;
}

API void fakenvml_reset_counts(void) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_NAMES; i++) call_counts[i] = 0;
    pthread_mutex_unlock(&mu);
}
