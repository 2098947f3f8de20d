"""The machine a benchmark ran on, for the head of its table.

These hosts name their CPU only "AMD EPYC" in /proc/cpuinfo, so the family and
model numbers (Zen 3 is family 25 model 1, Zen 4 family 25 model 17, Zen 5
family 26) and the instruction sets our kernels pick by come with it.
"""
import platform

ISA = (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("VNNI", "avx512_vnni"), ("AMX", "amx_int8"))


def cpu_fields(path="/proc/cpuinfo"):
    """The first processor's /proc/cpuinfo fields ({} where there is none)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_description(path="/proc/cpuinfo"):
    """E.g. "AMD EPYC (family 26 model 2; AVX2, AVX-512, VNNI)"."""
    fields = cpu_fields(path)
    if not fields:
        return platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    isa = ", ".join(name for name, flag in ISA if flag in flags) or "no AVX2"
    return (f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}; {isa})")
