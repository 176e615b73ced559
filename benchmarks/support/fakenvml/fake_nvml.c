/*
 * A stand-in for libnvidia-ml.so.1, so tests run the real pynvml bindings end to end on a
 * machine without an NVIDIA driver. It exports exactly the symbols nvidia-ml-py looks up (by
 * name, lazily) for what watchdog/gpu.py asks, with NVML's C signatures and structs.
 *
 * Values come from the text file named by $FAKE_NVML_FILE, re-read on every call so a test can
 * change them between two samples of one process. Lines (see benchmarks/support/fakenvml/__init__.py):
 *   driver <version>
 *   cuda <int, e.g. 12040>                        (absent: NOT_SUPPORTED)
 *   gpu <util%> <used B> <total B> <temp C> <power mW> <uuid> <name, rest of line>
 *   proc <gpu index> <c|g> <pid> <used B>          (c: compute, g: graphics)
 * "NA" in a util/temp/power field makes that query return NVML_ERROR_NOT_SUPPORTED; "NA" as a
 * process's memory is NVML's "not available" value. A missing file makes init fail with
 * NVML_ERROR_DRIVER_NOT_LOADED, as a host whose kernel module is not loaded.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
};

typedef struct fake_device *nvmlDevice_t; /* opaque to callers: index + 1 */
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

#define MAX_GPUS 64
#define MAX_PROCS 512
#define NA (-1LL)

typedef struct {
    long long util, temp, power;
    unsigned long long used, total;
    char uuid[96], name[96];
} gpu_t;

typedef struct {
    unsigned int gpu, pid;
    char kind;
    unsigned long long used;
} proc_t;

static struct {
    char driver[80];
    int cuda, has_cuda;
    unsigned int ngpus, nprocs;
    gpu_t gpus[MAX_GPUS];
    proc_t procs[MAX_PROCS];
} v;

static int initialised;

static long long optional(const char *s) { return strcmp(s, "NA") == 0 ? NA : strtoll(s, NULL, 10); }

static nvmlReturn_t load(void) {
    const char *path = getenv("FAKE_NVML_FILE");
    FILE *f = path ? fopen(path, "r") : NULL;
    char line[512], a[32], b[32], c[32], d[32], e[32], uuid[96];
    int rest;
    if (!f) return NVML_ERROR_DRIVER_NOT_LOADED;
    memset(&v, 0, sizeof v);
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "driver %79s", v.driver) == 1) continue;
        if (sscanf(line, "cuda %d", &v.cuda) == 1) {
            v.has_cuda = 1;
        } else if (v.ngpus < MAX_GPUS &&
                   sscanf(line, "gpu %31s %31s %31s %31s %31s %95s %n", a, b, c, d, e, uuid, &rest) == 6) {
            gpu_t *g = &v.gpus[v.ngpus++];
            g->util = optional(a);
            g->used = strtoull(b, NULL, 10);
            g->total = strtoull(c, NULL, 10);
            g->temp = optional(d);
            g->power = optional(e);
            snprintf(g->uuid, sizeof g->uuid, "%s", uuid);
            snprintf(g->name, sizeof g->name, "%s", line + rest);
        } else if (v.nprocs < MAX_PROCS) {
            proc_t *p = &v.procs[v.nprocs];
            if (sscanf(line, "proc %u %c %u %31s", &p->gpu, &p->kind, &p->pid, a) == 4) {
                p->used = (unsigned long long)optional(a); /* NA -> ULLONG_MAX, NVML's "not available" */
                v.nprocs++;
            }
        }
    }
    fclose(f);
    return NVML_SUCCESS;
}

/* Every query starts here: refuse before init, then re-read the values file. */
static nvmlReturn_t begin(void) { return initialised ? load() : NVML_ERROR_UNINITIALIZED; }

static nvmlReturn_t device(nvmlDevice_t handle, gpu_t **out) {
    nvmlReturn_t ret = begin();
    uintptr_t index = (uintptr_t)handle - 1;
    if (ret != NVML_SUCCESS) return ret;
    if (handle == NULL || index >= v.ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    *out = &v.gpus[index];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(const char *value, char *buf, unsigned int length) {
    if (buf == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) >= length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buf, value);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    nvmlReturn_t ret = load();
    (void)flags;
    if (ret == NVML_SUCCESS) initialised++;
    return ret;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    initialised--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    nvmlReturn_t ret = begin();
    return ret != NVML_SUCCESS ? ret : copy_string(v.driver, version, length);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cuda) {
    nvmlReturn_t ret = begin();
    if (ret != NVML_SUCCESS) return ret;
    if (!v.has_cuda) return NVML_ERROR_NOT_SUPPORTED;
    *cuda = v.cuda;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    nvmlReturn_t ret = begin();
    if (ret == NVML_SUCCESS) *count = v.ngpus;
    return ret;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *handle) {
    nvmlReturn_t ret = begin();
    if (ret != NVML_SUCCESS) return ret;
    if (index >= v.ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    *handle = (nvmlDevice_t)(uintptr_t)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t handle, char *name, unsigned int length) {
    gpu_t *g;
    nvmlReturn_t ret = device(handle, &g);
    return ret != NVML_SUCCESS ? ret : copy_string(g->name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t handle, char *uuid, unsigned int length) {
    gpu_t *g;
    nvmlReturn_t ret = device(handle, &g);
    return ret != NVML_SUCCESS ? ret : copy_string(g->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t handle, nvmlUtilization_t *util) {
    gpu_t *g;
    nvmlReturn_t ret = device(handle, &g);
    if (ret != NVML_SUCCESS) return ret;
    if (g->util == NA) return NVML_ERROR_NOT_SUPPORTED;
    util->gpu = (unsigned int)g->util;
    util->memory = 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t handle, nvmlMemory_t *memory) {
    gpu_t *g;
    nvmlReturn_t ret = device(handle, &g);
    if (ret != NVML_SUCCESS) return ret;
    memory->total = g->total;
    memory->used = g->used;
    memory->free = g->total > g->used ? g->total - g->used : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t handle, int sensor, unsigned int *temp) {
    gpu_t *g;
    nvmlReturn_t ret = device(handle, &g);
    if (ret != NVML_SUCCESS) return ret;
    if (sensor != 0 || g->temp == NA) return NVML_ERROR_NOT_SUPPORTED; /* 0: NVML_TEMPERATURE_GPU */
    *temp = (unsigned int)g->temp;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t handle, unsigned int *milliwatts) {
    gpu_t *g;
    nvmlReturn_t ret = device(handle, &g);
    if (ret != NVML_SUCCESS) return ret;
    if (g->power == NA) return NVML_ERROR_NOT_SUPPORTED;
    *milliwatts = (unsigned int)g->power;
    return NVML_SUCCESS;
}

/* NVML's two-call protocol: too small a buffer (or none) gets the count and INSUFFICIENT_SIZE. */
static nvmlReturn_t running(nvmlDevice_t handle, char kind, unsigned int *count, nvmlProcessInfo_t *infos) {
    gpu_t *g;
    unsigned int i, n = 0;
    nvmlReturn_t ret = device(handle, &g);
    if (ret != NVML_SUCCESS) return ret;
    unsigned int index = (unsigned int)(g - v.gpus);
    for (i = 0; i < v.nprocs; i++)
        if (v.procs[i].gpu == index && v.procs[i].kind == kind) n++;
    if (infos == NULL || *count < n) {
        *count = n;
        return n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    *count = n;
    for (i = 0, n = 0; i < v.nprocs; i++) {
        if (v.procs[i].gpu != index || v.procs[i].kind != kind) continue;
        infos[n].pid = v.procs[i].pid;
        infos[n].usedGpuMemory = v.procs[i].used;
        infos[n].gpuInstanceId = infos[n].computeInstanceId = 0xFFFFFFFFu; /* not a MIG instance */
        n++;
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t handle, unsigned int *count, nvmlProcessInfo_t *infos) {
    return running(handle, 'c', count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t handle, unsigned int *count, nvmlProcessInfo_t *infos) {
    return running(handle, 'g', count, infos);
}
