/* AVX-512 VNNI vec_dot kernels (matmul_vnni.c): the same dots as the AVX2
 * kernels in matmul.c, on the same activation rows, with vpdpbusd doing in one
 * instruction what maddubs + madd do in two, on 64-byte vectors; and, in the
 * same family, 16-lane float kernels for F32 / F16 / BF16 weights. Compiled for
 * every x86-64 build with per-function targets; used only where the CPU and
 * OS have AVX-512 F/BW/VL + VNNI and PYFORGE_DISABLE_VNNI is unset.
 */
#ifndef PYFORGE_MATMUL_VNNI_H
#define PYFORGE_MATMUL_VNNI_H

#include "quants.h"

/* 1 when the VNNI kernels may run here (probed once). */
int pf_vnni_available(void);

/* The VNNI vec_dot for weights of ggml type `type`, or NULL where there is none
 * (or none built). */
pf_vec_dot_fn pf_vnni_vec_dot(int type);

/* Its tiles for the x16 GEMMs: pf_vnni_x16_tile (x16_formats.h). */

/* The AVX-512 prefill tile for F32 / F16 / BF16 weights (pf_vec_dot_tile_fn
 * over PF_VNNI_DENSE_TILE_ROWS weight rows x 4 activation rows), or NULL. It
 * needs only AVX-512F but runs as part of this family (same probe, same
 * PYFORGE_DISABLE_VNNI switch). */
#define PF_VNNI_DENSE_TILE_ROWS 6
pf_vec_dot_tile_fn pf_vnni_dense_tile(int type);

#endif
