/*
 * Monte-Carlo estimate of pi as a vcomp job (spec: protocol/spec/domain.md).
 *
 * Input  (START payload):  {"points": N, "seed": S}
 * Output (RESULT payload): {"inside": k, "points": N}
 *                          (with "resumed_at": D when the input has "report_resume": true
 *                          and the run resumed from a checkpoint with D points done)
 * Progress: a PROGRESS frame every 1/100 of the points, each after a CHECKPOINT frame
 * holding "done inside s0 s1 s2 s3" (decimal: points done, hits, generator state).
 * A RESUME frame before START carries the last checkpoint: the run goes on from it
 * and ends with exactly the counts of an uninterrupted run.
 *
 * Build:  gcc -O2 -static-pie -o pi pi.c     (or plain: gcc -O2 -o pi pi.c)
 * Run locally in the sandbox:
 *         echo '{"points": 1000000, "seed": 1}' > in.json
 *         vcomp-agent sandbox-run pi --kind exec --input in.json
 *
 * Frames: type byte, u32 big-endian length, payload. fd 3 = input, fd 4 = output.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { IN_FD = 3, OUT_FD = 4 };
enum { START = 0x01, RESULT = 0x02, PROGRESS = 0x03, ERROR = 0x04, CHECKPOINT = 0x05, RESUME = 0x06 };
enum { MAX_INPUT = 4096, MAX_STATE = 256, EXIT_ERROR = 1 };

static int write_all(const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(OUT_FD, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_frame(unsigned char type, const void *payload, uint32_t len) {
    unsigned char header[5] = {type, (unsigned char)(len >> 24), (unsigned char)(len >> 16),
                               (unsigned char)(len >> 8), (unsigned char)len};
    if (write_all(header, sizeof header) < 0) return -1;
    return write_all(payload, len);
}

static void send_progress(uint64_t done, uint64_t total) {
    uint32_t m = (uint32_t)(total ? (done * 1000000u) / total : 1000000u);
    unsigned char p[4] = {(unsigned char)(m >> 24), (unsigned char)(m >> 16),
                          (unsigned char)(m >> 8), (unsigned char)m};
    send_frame(PROGRESS, p, 4);
}

static int fail(const char *msg) {
    send_frame(ERROR, msg, (uint32_t)strlen(msg));
    return EXIT_ERROR;
}

static int read_exact(unsigned char *buf, size_t n) {
    while (n > 0) {
        ssize_t r = read(IN_FD, buf, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        buf += r;
        n -= (size_t)r;
    }
    return 0;
}

/* The unsigned integer after "key": in a flat JSON object; -1 if absent. */
static int json_u64(const char *text, const char *key, uint64_t *out) {
    char pattern[32];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    const char *p = strstr(text, pattern);
    if (!p) return -1;
    p += strlen(pattern);
    while (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n') p++;
    if (*p < '0' || *p > '9') return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(p, &end, 10);
    if (errno) return -1;
    *out = v;
    return 0;
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* xoshiro256+ : fast, and its top 53 bits are fine for doubles. */
static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t next(uint64_t s[4]) {
    uint64_t result = s[0] + s[3];
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static uint32_t frame_length(const unsigned char header[5]) {
    return ((uint32_t)header[1] << 24) | ((uint32_t)header[2] << 16) |
           ((uint32_t)header[3] << 8) | header[4];
}

static void send_checkpoint(uint64_t done, uint64_t inside, const uint64_t s[4]) {
    char state[MAX_STATE];
    int n = snprintf(state, sizeof state, "%llu %llu %llu %llu %llu %llu",
                     (unsigned long long)done, (unsigned long long)inside,
                     (unsigned long long)s[0], (unsigned long long)s[1],
                     (unsigned long long)s[2], (unsigned long long)s[3]);
    send_frame(CHECKPOINT, state, (uint32_t)n);
}

int main(void) {
    unsigned char header[5];
    char resume[MAX_STATE];
    int resumed = 0;
    if (read_exact(header, 5) < 0) return fail("expected a START frame");
    if (header[0] == RESUME) {
        uint32_t n = frame_length(header);
        if (n >= MAX_STATE) return fail("RESUME state too large");
        if (read_exact((unsigned char *)resume, n) < 0) return fail("truncated RESUME frame");
        resume[n] = '\0';
        resumed = 1;
        if (read_exact(header, 5) < 0) return fail("expected a START frame");
    }
    if (header[0] != START) return fail("expected a START frame");
    uint32_t len = frame_length(header);
    if (len >= MAX_INPUT) return fail("input too large");
    char input[MAX_INPUT];
    if (read_exact((unsigned char *)input, len) < 0) return fail("truncated START frame");
    input[len] = '\0';

    uint64_t points, seed;
    if (json_u64(input, "points", &points) < 0) return fail("input needs \"points\"");
    if (json_u64(input, "seed", &seed) < 0) seed = 0;
    const char *report = strstr(input, "\"report_resume\"");
    uint64_t report_resume = 0;
    if (report) {
        report += strlen("\"report_resume\"");
        while (*report == ' ' || *report == ':' || *report == '\t' || *report == '\n') report++;
        report_resume = strncmp(report, "true", 4) == 0 || (*report >= '1' && *report <= '9');
    }

    uint64_t s[4], sm = seed;
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&sm);

    const double scale = 1.0 / 9007199254740992.0; /* 2^-53 */
    uint64_t inside = 0, done = 0, step = points / 100 + 1;
    if (resumed) {
        unsigned long long v[6];
        if (sscanf(resume, "%llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                   &v[5]) != 6 || v[1] > v[0] || v[0] > points)
            return fail("checkpoint does not fit this input");
        done = v[0];
        inside = v[1];
        for (int i = 0; i < 4; i++) s[i] = v[2 + i];
    }
    const uint64_t started_at = done;
    send_progress(done, points);
    while (done < points) {
        uint64_t chunk = points - done < step ? points - done : step;
        for (uint64_t i = 0; i < chunk; i++) {
            double x = (double)(next(s) >> 11) * scale;
            double y = (double)(next(s) >> 11) * scale;
            inside += x * x + y * y <= 1.0;
        }
        done += chunk;
        send_checkpoint(done, inside, s);
        send_progress(done, points);
    }

    char out[160];
    int n = snprintf(out, sizeof out, "{\"inside\": %llu, \"points\": %llu}",
                     (unsigned long long)inside, (unsigned long long)points);
    if (report_resume && started_at)
        n = snprintf(out, sizeof out, "{\"inside\": %llu, \"points\": %llu, \"resumed_at\": %llu}",
                     (unsigned long long)inside, (unsigned long long)points,
                     (unsigned long long)started_at);
    if (send_frame(RESULT, out, (uint32_t)n) < 0) return EXIT_ERROR;
    return 0;
}
