/* A fake libnvidia-ml.so.1 for tests: the real pynvml loads it and runs its real code paths.
 *
 * State comes from the text file named by $FAKE_NVML_CONFIG, re-read whenever its inode, size or mtime
 * changes (writers rename a new file into place and bump the mtime). One record per line, `kind key=value ...`,
 * values percent-escaped (%20 for a space); `#` starts a comment:
 *
 *   driver  version=535.104.05
 *   option  empty_process_util=not_found|success     (what nvmlDeviceGetProcessUtilization says with no samples)
 *   gpu     uuid=GPU-.. name=NVIDIA%20A100 memory_total=N [memory_used=N|NA] [util=P] [mem_util=P]
 *           [mig=0|1|unsupported] [max_mig=7]        (gpus are indexed in file order)
 *   mig     parent=0 slot=0 uuid=MIG-.. [memory_total=N] [memory_used=N]
 *   proc    gpu=0 pid=123 [mem=N|NA]
 *   sample  gpu=0 pid=123 ts=MICROSECONDS [sm=P] [mem=P] [enc=P] [dec=P]
 *   error   fn=NAME|* [gpu=I] code=N                 (fn=* matches every function taking a device)
 *   delay   fn=NAME|* [gpu=I] ms=N                   (sleeps before the call; ends early once the line is removed)
 *
 * With $FAKE_NVML_CALL_LOG set, every call appends "function device" (device "-" when none, "P/mS" for a MIG
 * device) to that file. Build with -DFAKE_NO_PROC_V3 / -DFAKE_NO_PROC_V2 to hide the newer process-list symbols.
 * A config line that does not parse makes every call fail with NVML_ERROR_UNKNOWN (and says why on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_UNKNOWN 999
#define VALUE_NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL

#define MAX_GPUS 16
#define MAX_MIG_SLOTS 8
#define MAX_PROCS 512
#define MAX_SAMPLES 2048
#define MAX_RULES 64
#define NAME_LEN 96

typedef struct { int kind; int gpu; int slot; } fake_handle; /* kind 1: GPU, 2: MIG device */
typedef fake_handle *nvmlDevice_t;

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_v2_t;
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

struct gpu { char uuid[NAME_LEN], name[NAME_LEN]; unsigned long long mem_total, mem_used; int mem_used_set;
             unsigned util, mem_util; int mig; unsigned max_mig; };
struct mig { int parent; unsigned slot; char uuid[NAME_LEN]; unsigned long long mem_total, mem_used; };
struct proc { int gpu; unsigned pid; unsigned long long mem; };
struct sample { int gpu; unsigned pid; unsigned long long ts; unsigned sm, mem, enc, dec; };
struct rule { char fn[NAME_LEN]; int gpu; long value; }; /* error: value = code; delay: value = ms */

struct config {
    char driver[80];
    int empty_util_success;
    int n_gpus, n_migs, n_procs, n_samples, n_errors, n_delays;
    struct gpu gpus[MAX_GPUS];
    struct mig migs[MAX_GPUS * MAX_MIG_SLOTS];
    struct proc procs[MAX_PROCS];
    struct sample samples[MAX_SAMPLES];
    struct rule errors[MAX_RULES], delays[MAX_RULES];
    int broken; /* a line did not parse */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct config cfg;
static int init_count;
static char loaded_path[4096];
static struct stat loaded_stat;
static int loaded_ok;
static fake_handle gpu_handles[MAX_GPUS];
static fake_handle mig_handles[MAX_GPUS * MAX_MIG_SLOTS];

/* ------------------------------------------------------------------ config parsing */

static void unescape(char *s) {
    char *out = s;
    for (; *s; s++) {
        if (s[0] == '%' && s[1] && s[2]) {
            char hex[3] = {s[1], s[2], 0};
            *out++ = (char)strtol(hex, NULL, 16);
            s += 2;
        } else {
            *out++ = *s;
        }
    }
    *out = 0;
}

static int parse_ull(const char *v, unsigned long long *out) {
    char *end;
    if (strcmp(v, "NA") == 0) { *out = VALUE_NOT_AVAILABLE; return 0; }
    errno = 0;
    *out = strtoull(v, &end, 10);
    return (errno || *end || end == v) ? -1 : 0;
}

static int parse_int(const char *v, long *out) {
    char *end;
    errno = 0;
    *out = strtol(v, &end, 10);
    return (errno || *end || end == v) ? -1 : 0;
}

/* One `key=value` token into the record being built; returns -1 on an unknown key or bad value. */
static int apply_kv(const char *kind, char *key, char *val, struct config *c) {
    unsigned long long u = 0;
    long n = 0;
    if (strcmp(kind, "driver") == 0) {
        if (strcmp(key, "version") != 0) return -1;
        snprintf(c->driver, sizeof c->driver, "%s", val);
        return 0;
    }
    if (strcmp(kind, "option") == 0) {
        if (strcmp(key, "empty_process_util") != 0) return -1;
        if (strcmp(val, "success") == 0) c->empty_util_success = 1;
        else if (strcmp(val, "not_found") == 0) c->empty_util_success = 0;
        else return -1;
        return 0;
    }
    if (strcmp(kind, "gpu") == 0) {
        struct gpu *g = &c->gpus[c->n_gpus - 1];
        if (strcmp(key, "uuid") == 0) snprintf(g->uuid, NAME_LEN, "%s", val);
        else if (strcmp(key, "name") == 0) snprintf(g->name, NAME_LEN, "%s", val);
        else if (strcmp(key, "memory_total") == 0) return parse_ull(val, &g->mem_total);
        else if (strcmp(key, "memory_used") == 0) { g->mem_used_set = 1; return parse_ull(val, &g->mem_used); }
        else if (strcmp(key, "util") == 0) { if (parse_int(val, &n)) return -1; g->util = (unsigned)n; }
        else if (strcmp(key, "mem_util") == 0) { if (parse_int(val, &n)) return -1; g->mem_util = (unsigned)n; }
        else if (strcmp(key, "mig") == 0) {
            if (strcmp(val, "unsupported") == 0) g->mig = -1;
            else if (strcmp(val, "0") == 0 || strcmp(val, "1") == 0) g->mig = val[0] - '0';
            else return -1;
        } else if (strcmp(key, "max_mig") == 0) {
            if (parse_int(val, &n) || n < 0 || n > MAX_MIG_SLOTS) return -1;
            g->max_mig = (unsigned)n;
        } else return -1;
        return 0;
    }
    if (strcmp(kind, "mig") == 0) {
        struct mig *m = &c->migs[c->n_migs - 1];
        if (strcmp(key, "parent") == 0) { if (parse_int(val, &n)) return -1; m->parent = (int)n; }
        else if (strcmp(key, "slot") == 0) {
            if (parse_int(val, &n) || n < 0 || n >= MAX_MIG_SLOTS) return -1;
            m->slot = (unsigned)n;
        } else if (strcmp(key, "uuid") == 0) snprintf(m->uuid, NAME_LEN, "%s", val);
        else if (strcmp(key, "memory_total") == 0) return parse_ull(val, &m->mem_total);
        else if (strcmp(key, "memory_used") == 0) return parse_ull(val, &m->mem_used);
        else return -1;
        return 0;
    }
    if (strcmp(kind, "proc") == 0) {
        struct proc *p = &c->procs[c->n_procs - 1];
        if (strcmp(key, "gpu") == 0) { if (parse_int(val, &n)) return -1; p->gpu = (int)n; }
        else if (strcmp(key, "pid") == 0) { if (parse_int(val, &n)) return -1; p->pid = (unsigned)n; }
        else if (strcmp(key, "mem") == 0) return parse_ull(val, &p->mem);
        else return -1;
        return 0;
    }
    if (strcmp(kind, "sample") == 0) {
        struct sample *s = &c->samples[c->n_samples - 1];
        if (strcmp(key, "ts") == 0) { if (parse_ull(val, &u)) return -1; s->ts = u; return 0; }
        if (parse_int(val, &n)) return -1;
        if (strcmp(key, "gpu") == 0) s->gpu = (int)n;
        else if (strcmp(key, "pid") == 0) s->pid = (unsigned)n;
        else if (strcmp(key, "sm") == 0) s->sm = (unsigned)n;
        else if (strcmp(key, "mem") == 0) s->mem = (unsigned)n;
        else if (strcmp(key, "enc") == 0) s->enc = (unsigned)n;
        else if (strcmp(key, "dec") == 0) s->dec = (unsigned)n;
        else return -1;
        return 0;
    }
    if (strcmp(kind, "error") == 0 || strcmp(kind, "delay") == 0) {
        struct rule *r = kind[0] == 'e' ? &c->errors[c->n_errors - 1] : &c->delays[c->n_delays - 1];
        if (strcmp(key, "fn") == 0) snprintf(r->fn, NAME_LEN, "%s", val);
        else if (strcmp(key, "gpu") == 0) { if (parse_int(val, &n)) return -1; r->gpu = (int)n; }
        else if (strcmp(key, kind[0] == 'e' ? "code" : "ms") == 0) return parse_int(val, &r->value);
        else return -1;
        return 0;
    }
    return -1;
}

/* Start a new record of `kind`; returns -1 when the kind is unknown or its table is full. */
static int begin_record(const char *kind, struct config *c) {
    if (strcmp(kind, "driver") == 0 || strcmp(kind, "option") == 0) return 0;
    if (strcmp(kind, "gpu") == 0) {
        if (c->n_gpus >= MAX_GPUS) return -1;
        struct gpu *g = &c->gpus[c->n_gpus++];
        snprintf(g->name, NAME_LEN, "Fake GPU");
        g->max_mig = 7;
        return 0;
    }
    if (strcmp(kind, "mig") == 0) return c->n_migs < MAX_GPUS * MAX_MIG_SLOTS ? (c->n_migs++, 0) : -1;
    if (strcmp(kind, "proc") == 0) return c->n_procs < MAX_PROCS ? (c->n_procs++, 0) : -1;
    if (strcmp(kind, "sample") == 0) return c->n_samples < MAX_SAMPLES ? (c->n_samples++, 0) : -1;
    if (strcmp(kind, "error") == 0) {
        if (c->n_errors >= MAX_RULES) return -1;
        c->errors[c->n_errors++].gpu = -1;
        return 0;
    }
    if (strcmp(kind, "delay") == 0) {
        if (c->n_delays >= MAX_RULES) return -1;
        c->delays[c->n_delays++].gpu = -1;
        return 0;
    }
    return -1;
}

static void parse_config(FILE *f, struct config *c) {
    char line[1024];
    int lineno = 0;
    memset(c, 0, sizeof *c);
    snprintf(c->driver, sizeof c->driver, "535.104.05");
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char *save = NULL;
        char *kind = strtok_r(line, " \t\r\n", &save);
        if (!kind) continue;
        if (begin_record(kind, c) != 0) goto bad;
        for (char *tok; (tok = strtok_r(NULL, " \t\r\n", &save));) {
            char *eq = strchr(tok, '=');
            if (!eq) goto bad;
            *eq = 0;
            unescape(eq + 1);
            if (apply_kv(kind, tok, eq + 1, c) != 0) goto bad;
        }
        continue;
    bad:
        fprintf(stderr, "fake_nvml: %s line %d does not parse\n", loaded_path, lineno);
        c->broken = 1;
    }
    for (int i = 0; i < c->n_gpus; i++) {
        struct gpu *g = &c->gpus[i];
        if (g->mem_used_set) continue;
        g->mem_used = 0;
        for (int p = 0; p < c->n_procs; p++)
            if (c->procs[p].gpu == i && c->procs[p].mem != VALUE_NOT_AVAILABLE) g->mem_used += c->procs[p].mem;
    }
}

/* Re-read the config when the file changed. Caller holds the lock. */
static void refresh(void) {
    const char *path = getenv("FAKE_NVML_CONFIG");
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        if (loaded_ok || loaded_path[0] || cfg.n_gpus) { memset(&cfg, 0, sizeof cfg); }
        snprintf(cfg.driver, sizeof cfg.driver, "535.104.05");
        loaded_ok = 0;
        loaded_path[0] = 0;
        return;
    }
    if (loaded_ok && strcmp(path, loaded_path) == 0 && st.st_ino == loaded_stat.st_ino &&
        st.st_size == loaded_stat.st_size && st.st_mtim.tv_sec == loaded_stat.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == loaded_stat.st_mtim.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    snprintf(loaded_path, sizeof loaded_path, "%s", path);
    static struct config next;
    parse_config(f, &next);
    fclose(f);
    cfg = next;
    loaded_stat = st;
    loaded_ok = 1;
}

/* ------------------------------------------------------------------ call plumbing */

static void log_call(const char *fn, const char *dev) {
    const char *path = getenv("FAKE_NVML_CALL_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s %s\n", fn, dev);
    fclose(f);
}

static const struct rule *find_rule(const struct rule *rules, int n, const char *fn, int gpu) {
    for (int i = 0; i < n; i++) {
        int fn_ok = strcmp(rules[i].fn, fn) == 0 || (gpu >= 0 && strcmp(rules[i].fn, "*") == 0);
        if (fn_ok && (rules[i].gpu < 0 || rules[i].gpu == gpu)) return &rules[i];
    }
    return NULL;
}

/* Sleep while a delay rule for (fn, gpu) is configured, up to its ms. Caller holds the lock; it is released while
 * sleeping so other threads (and the test changing the config) go on. */
static void apply_delay(const char *fn, int gpu) {
    struct timespec start, now, step = {0, 5 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        const struct rule *r = find_rule(cfg.delays, cfg.n_delays, fn, gpu);
        if (!r) return;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed_ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed_ms >= r->value) return;
        pthread_mutex_unlock(&lock);
        nanosleep(&step, NULL);
        pthread_mutex_lock(&lock);
        refresh();
    }
}

/* Common prologue: lock, reload, log, delay, then an injected error or NVML's own preconditions.
 * Returns NVML_SUCCESS to go on (lock held) or the code to return (lock still held: the caller unlocks). */
static nvmlReturn_t enter(const char *fn, int gpu, int slot, int needs_init) {
    char dev[32];
    pthread_mutex_lock(&lock);
    refresh();
    if (gpu < 0) snprintf(dev, sizeof dev, "-");
    else if (slot < 0) snprintf(dev, sizeof dev, "%d", gpu);
    else snprintf(dev, sizeof dev, "%d/m%d", gpu, slot);
    log_call(fn, dev);
    apply_delay(fn, gpu);
    if (cfg.broken) return NVML_ERROR_UNKNOWN;
    if (needs_init && init_count == 0) return NVML_ERROR_UNINITIALIZED;
    const struct rule *e = find_rule(cfg.errors, cfg.n_errors, fn, gpu);
    if (e) return (nvmlReturn_t)e->value;
    return NVML_SUCCESS;
}

#define RETURN(code) do { nvmlReturn_t rc_ = (code); pthread_mutex_unlock(&lock); return rc_; } while (0)

/* Resolve a handle to (gpu, slot); slot -1 for a physical GPU. -1 when the handle is not ours or is stale. */
static int resolve(nvmlDevice_t d, int *gpu, int *slot) {
    if (!d || (d->kind != 1 && d->kind != 2)) return -1;
    if (d->kind == 1) {
        if (d < gpu_handles || d >= gpu_handles + MAX_GPUS) return -1;
        *gpu = d->gpu; *slot = -1;
        return 0;
    }
    if (d < mig_handles || d >= mig_handles + MAX_GPUS * MAX_MIG_SLOTS) return -1;
    *gpu = d->gpu; *slot = d->slot;
    return 0;
}

static struct mig *find_mig(int gpu, int slot) {
    for (int i = 0; i < cfg.n_migs; i++)
        if (cfg.migs[i].parent == gpu && (int)cfg.migs[i].slot == slot) return &cfg.migs[i];
    return NULL;
}

/* Prologue for functions taking a device handle: also checks the handle is still valid for the config. */
#define DEVICE_ENTER(fn, handle, gpu, slot)                                                       \
    int gpu = -1, slot = -1;                                                                      \
    if (resolve((handle), &gpu, &slot) != 0) { pthread_mutex_lock(&lock); RETURN(NVML_ERROR_INVALID_ARGUMENT); } \
    { nvmlReturn_t rc0 = enter((fn), gpu, slot, 1); if (rc0 != NVML_SUCCESS) RETURN(rc0); }         \
    if (gpu >= cfg.n_gpus || (slot >= 0 && !find_mig(gpu, slot))) RETURN(NVML_ERROR_INVALID_ARGUMENT)

/* ------------------------------------------------------------------ init, system */

static nvmlReturn_t do_init(const char *fn) {
    nvmlReturn_t rc = enter(fn, -1, -1, 0);
    if (rc != NVML_SUCCESS) RETURN(rc);
    init_count++;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return do_init("nvmlInitWithFlags"); }
nvmlReturn_t nvmlInit_v2(void) { return do_init("nvmlInit_v2"); }
nvmlReturn_t nvmlInit(void) { return do_init("nvmlInit"); }

nvmlReturn_t nvmlShutdown(void) {
    nvmlReturn_t rc = enter("nvmlShutdown", -1, -1, 1);
    if (rc != NVML_SUCCESS) RETURN(rc);
    init_count--;
    RETURN(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    case 13: return "Function Not Found";
    case 15: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    nvmlReturn_t rc = enter("nvmlSystemGetDriverVersion", -1, -1, 1);
    if (rc != NVML_SUCCESS) RETURN(rc);
    if (!version) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (strlen(cfg.driver) + 1 > length) RETURN(NVML_ERROR_INSUFFICIENT_SIZE);
    snprintf(version, length, "%s", cfg.driver);
    RETURN(NVML_SUCCESS);
}

static nvmlReturn_t get_count(const char *fn, unsigned int *count) {
    nvmlReturn_t rc = enter(fn, -1, -1, 1);
    if (rc != NVML_SUCCESS) RETURN(rc);
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *count = (unsigned)cfg.n_gpus;
    RETURN(NVML_SUCCESS);
}
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { return get_count("nvmlDeviceGetCount_v2", count); }
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return get_count("nvmlDeviceGetCount", count); }

static nvmlReturn_t get_handle(const char *fn, unsigned int index, nvmlDevice_t *device) {
    nvmlReturn_t rc = enter(fn, (int)index < MAX_GPUS ? (int)index : -1, -1, 1);
    if (rc != NVML_SUCCESS) RETURN(rc);
    if (!device || index >= (unsigned)cfg.n_gpus) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    gpu_handles[index] = (fake_handle){1, (int)index, -1};
    *device = &gpu_handles[index];
    RETURN(NVML_SUCCESS);
}
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    return get_handle("nvmlDeviceGetHandleByIndex_v2", i, d);
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, nvmlDevice_t *d) {
    return get_handle("nvmlDeviceGetHandleByIndex", i, d);
}

/* ------------------------------------------------------------------ device information */

static nvmlReturn_t copy_string(const char *src, char *dst, unsigned int length) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(dst, length, "%s", src);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    DEVICE_ENTER("nvmlDeviceGetUUID", device, gpu, slot);
    RETURN(copy_string(slot >= 0 ? find_mig(gpu, slot)->uuid : cfg.gpus[gpu].uuid, uuid, length));
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    DEVICE_ENTER("nvmlDeviceGetName", device, gpu, slot);
    RETURN(copy_string(cfg.gpus[gpu].name, name, length));
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    DEVICE_ENTER("nvmlDeviceGetIndex", device, gpu, slot);
    if (!index) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned)gpu;
    RETURN(NVML_SUCCESS);
}

static void memory_of(int gpu, int slot, unsigned long long *total, unsigned long long *used) {
    if (slot >= 0) {
        struct mig *m = find_mig(gpu, slot);
        *total = m->mem_total;
        *used = m->mem_used;
    } else {
        *total = cfg.gpus[gpu].mem_total;
        *used = cfg.gpus[gpu].mem_used;
    }
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    DEVICE_ENTER("nvmlDeviceGetMemoryInfo", device, gpu, slot);
    if (!memory) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    unsigned long long total, used;
    memory_of(gpu, slot, &total, &used);
    memory->total = total;
    memory->used = used;
    memory->free = used == VALUE_NOT_AVAILABLE || used > total ? 0 : total - used;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    DEVICE_ENTER("nvmlDeviceGetMemoryInfo_v2", device, gpu, slot);
    if (!memory) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    unsigned long long total, used;
    memory_of(gpu, slot, &total, &used);
    memory->total = total;
    memory->reserved = 0;
    memory->used = used;
    memory->free = used == VALUE_NOT_AVAILABLE || used > total ? 0 : total - used;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    DEVICE_ENTER("nvmlDeviceGetUtilizationRates", device, gpu, slot);
    if (!utilization) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    /* like the real driver: no utilisation on a MIG device or a MIG-enabled GPU */
    if (slot >= 0 || cfg.gpus[gpu].mig == 1) RETURN(NVML_ERROR_NOT_SUPPORTED);
    utilization->gpu = cfg.gpus[gpu].util;
    utilization->memory = cfg.gpus[gpu].mem_util;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    DEVICE_ENTER("nvmlDeviceGetMigMode", device, gpu, slot);
    if (!current || !pending) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (slot >= 0 || cfg.gpus[gpu].mig < 0) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *current = *pending = (unsigned)cfg.gpus[gpu].mig;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    DEVICE_ENTER("nvmlDeviceGetMaxMigDeviceCount", device, gpu, slot);
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (slot >= 0 || cfg.gpus[gpu].mig < 0) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *count = cfg.gpus[gpu].mig == 1 ? cfg.gpus[gpu].max_mig : 0;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    DEVICE_ENTER("nvmlDeviceGetMigDeviceHandleByIndex", device, gpu, slot);
    if (!mig || slot >= 0) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (cfg.gpus[gpu].mig != 1) RETURN(NVML_ERROR_NOT_SUPPORTED);
    if (index >= cfg.gpus[gpu].max_mig) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!find_mig(gpu, (int)index)) RETURN(NVML_ERROR_NOT_FOUND);
    fake_handle *h = &mig_handles[gpu * MAX_MIG_SLOTS + (int)index];
    *h = (fake_handle){2, gpu, (int)index};
    *mig = h;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t mig, nvmlDevice_t *device) {
    DEVICE_ENTER("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", mig, gpu, slot);
    if (!device || slot < 0) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    gpu_handles[gpu] = (fake_handle){1, gpu, -1};
    *device = &gpu_handles[gpu];
    RETURN(NVML_SUCCESS);
}

/* ------------------------------------------------------------------ processes */

/* NVML's size-query convention: too small a buffer (or NULL with count 0) -> INSUFFICIENT_SIZE and the needed
 * count; no processes -> SUCCESS with count 0. `width` picks the struct layout (1: v1, 2: v2/v3). */
static nvmlReturn_t list_processes(int gpu, int slot, unsigned int *count, void *infos, int width) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (int i = 0; i < cfg.n_procs; i++)
        if (cfg.procs[i].gpu == gpu && slot < 0) n++;
    if (*count < n) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    if (n > 0 && !infos) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned k = 0;
    for (int i = 0; i < cfg.n_procs && k < n; i++) {
        if (cfg.procs[i].gpu != gpu) continue;
        if (width == 1) {
            nvmlProcessInfo_v1_t *p = (nvmlProcessInfo_v1_t *)infos + k++;
            p->pid = cfg.procs[i].pid;
            p->usedGpuMemory = cfg.procs[i].mem;
        } else {
            nvmlProcessInfo_v2_t *p = (nvmlProcessInfo_v2_t *)infos + k++;
            p->pid = cfg.procs[i].pid;
            p->usedGpuMemory = cfg.procs[i].mem;
            p->gpuInstanceId = p->computeInstanceId = 0xFFFFFFFFu;
        }
    }
    *count = n;
    return NVML_SUCCESS;
}

#ifndef FAKE_NO_PROC_V3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_v2_t *infos) {
    DEVICE_ENTER("nvmlDeviceGetComputeRunningProcesses_v3", device, gpu, slot);
    RETURN(list_processes(gpu, slot, count, infos, 2));
}
#endif

#ifndef FAKE_NO_PROC_V2
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_v2_t *infos) {
    DEVICE_ENTER("nvmlDeviceGetComputeRunningProcesses_v2", device, gpu, slot);
    RETURN(list_processes(gpu, slot, count, infos, 2));
}
#endif

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *count,
                                                  nvmlProcessInfo_v1_t *infos) {
    DEVICE_ENTER("nvmlDeviceGetComputeRunningProcesses", device, gpu, slot);
    RETURN(list_processes(gpu, slot, count, infos, 1));
}

/* Samples newer than lastSeenTimeStamp. NULL buffer -> INSUFFICIENT_SIZE and the count; none -> NOT_FOUND
 * (what drivers say; `option empty_process_util=success` makes it SUCCESS with count 0 instead). */
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device, nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *count, unsigned long long lastSeenTimeStamp) {
    DEVICE_ENTER("nvmlDeviceGetProcessUtilization", device, gpu, slot);
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (slot >= 0 || cfg.gpus[gpu].mig == 1) RETURN(NVML_ERROR_NOT_SUPPORTED);
    unsigned n = 0;
    for (int i = 0; i < cfg.n_samples; i++)
        if (cfg.samples[i].gpu == gpu && cfg.samples[i].ts > lastSeenTimeStamp) n++;
    if (n == 0) {
        *count = 0;
        RETURN(cfg.empty_util_success ? NVML_SUCCESS : NVML_ERROR_NOT_FOUND);
    }
    if (!utilization || *count < n) { *count = n; RETURN(NVML_ERROR_INSUFFICIENT_SIZE); }
    unsigned k = 0;
    for (int i = 0; i < cfg.n_samples; i++) {
        const struct sample *s = &cfg.samples[i];
        if (s->gpu != gpu || s->ts <= lastSeenTimeStamp) continue;
        utilization[k++] = (nvmlProcessUtilizationSample_t){s->pid, s->ts, s->sm, s->mem, s->enc, s->dec};
    }
    *count = k;
    RETURN(NVML_SUCCESS);
}
