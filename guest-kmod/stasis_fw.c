// SPDX-License-Identifier: GPL-2.0
/*
 * stasis_fw: the in-guest half of stasis' temporal firewall.
 *
 * 1. Measures, at kernel precision, whether a checkpoint was visible inside
 *    the guest: a hard-irq hrtimer samples CLOCK_MONOTONIC, CLOCK_REALTIME,
 *    CLOCK_BOOTTIME and the TSC every `period_us` and records, per clock, the
 *    largest step (interval between samples minus the period) and, per pair,
 *    the largest change of the disagreement (real - mono, boot - mono,
 *    tsc_ns - mono) between consecutive samples. Exported as one JSON line in
 *    /proc/stasis_fw; writing "reset" to it clears the maxima and counters.
 *
 * 2. On KVM, conceals the pause QEMU/KVM leaks through the TSC: kvmclock
 *    (and with it CLOCK_MONOTONIC) stops while the VM is stopped, the guest
 *    TSC does not. A jump of tsc_ns - mono larger than `pause_threshold_us`
 *    between two samples is taken as a hypervisor pause; the module then
 *    moves every CPU's TSC back by that amount through MSR_IA32_TSC_ADJUST
 *    (KVM re-bases kvmclock on such a write, see kvm_set_msr_common()).
 *    The pvclock PVCLOCK_GUEST_STOPPED flag of CPU 0's kvmclock page is
 *    counted as corroboration. Active only when kvm_para_available() and the
 *    CPU has TSC_ADJUST; otherwise /proc says "active":false and why.
 *
 * Locking: the timer callback (hard irq, one CPU) and the /proc handlers
 * share `fw.lock` (irqsave). Nothing here sleeps in the timer; the MSR
 * writes on all CPUs run from a work item (on_each_cpu() must not be called
 * with interrupts disabled).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/hrtimer.h>
#include <linux/ktime.h>
#include <linux/timekeeping.h>
#include <linux/math64.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>
#include <linux/smp.h>
#include <linux/uaccess.h>
#include <linux/string.h>
#include <asm/tsc.h>
#include <asm/msr.h>
#include <asm/cpufeature.h>
#include <asm/kvm_para.h>
#include <asm/pvclock.h>

static unsigned int period_us = 1000;
module_param(period_us, uint, 0444);
MODULE_PARM_DESC(period_us, "sampling period of the hrtimer in microseconds (default 1000)");

static unsigned int step_threshold_us = 1000;
module_param(step_threshold_us, uint, 0444);
MODULE_PARM_DESC(step_threshold_us, "a step larger than this is counted in steps_over (default 1000)");

static unsigned int dis_threshold_us = 100;
module_param(dis_threshold_us, uint, 0444);
MODULE_PARM_DESC(dis_threshold_us, "a disagreement change larger than this is counted in dis_over (default 100)");

static unsigned int pause_threshold_us = 20000;
module_param(pause_threshold_us, uint, 0444);
MODULE_PARM_DESC(pause_threshold_us, "KVM: a tsc-mono jump larger than this is a hypervisor pause (default 20000)");

static bool compensate = true;
module_param(compensate, bool, 0444);
MODULE_PARM_DESC(compensate, "KVM: compensate detected pauses through IA32_TSC_ADJUST (default on)");

/* A sample is retried when its clock reads are bracketed by more than this
 * many TSC nanoseconds (the vCPU was descheduled in between); the retried
 * attempts are counted as "noisy". */
#define BRACKET_MAX_NS 50000ULL
#define BRACKET_TRIES 4

enum { C_MONO, C_REAL, C_BOOT, C_TSC, NCLOCKS };
enum { D_REAL, D_BOOT, D_TSC, NDIS };
static const char *const clock_names[NCLOCKS] = { "mono", "real", "boot", "tsc" };
static const char *const dis_names[NDIS] = { "real_mono", "boot_mono", "tsc_mono" };

struct sample {
	s64 t[NCLOCKS]; /* ns; t[C_TSC] is the TSC converted with tsc_khz */
	u64 tsc;        /* raw cycles (for compensation) */
};

/* Everything /proc shows; copied out under the lock. */
struct fw_stats {
	u64 samples, noisy;
	s64 reset_mono;
	s64 max_step[NCLOCKS];  /* largest |delta - period| */
	u64 steps_over[NCLOCKS];
	s64 max_dis[NDIS];      /* largest |change of (x - mono)| */
	u64 dis_over[NDIS];
	/* KVM pause concealment */
	u64 pauses, stopped_flag, adjust_writes;
	s64 compensated_ns, last_pause_ns;
};

struct fw_state {
	spinlock_t lock;
	struct hrtimer timer;
	struct work_struct adjust_work;
	bool have_prev;
	bool adjusting;         /* TSC_ADJUST writes in flight: no deltas */
	struct sample prev;
	struct fw_stats st;
	bool kvm_active;        /* set once at init */
	const char *kvm_reason; /* static string, set once at init */
	u64 pending_cycles;     /* to subtract from every CPU's TSC_ADJUST */
};

static struct fw_state fw;

static inline u64 tsc_to_ns(u64 cycles)
{
	/* tsc_khz cycles per ms: ns = cycles * 10^6 / tsc_khz (128-bit intermediate). */
	return mul_u64_u32_div(cycles, 1000000U, tsc_khz);
}

/* Read all clocks as close together as possible; returns false when every
 * attempt was stretched (the sample is still used). Called in hard irq. */
static bool take_sample(struct sample *s)
{
	int i;

	for (i = 0; i < BRACKET_TRIES; i++) {
		u64 t1 = rdtsc_ordered(), t2;

		s->t[C_MONO] = ktime_get_ns();
		s->t[C_REAL] = ktime_get_real_ns();
		s->t[C_BOOT] = ktime_get_boottime_ns();
		t2 = rdtsc_ordered();
		s->tsc = t1 + (t2 - t1) / 2;
		s->t[C_TSC] = tsc_khz ? (s64)tsc_to_ns(s->tsc) : 0;
		if (!tsc_khz || tsc_to_ns(t2 - t1) <= BRACKET_MAX_NS)
			return true;
		fw.st.noisy++;
	}
	return false;
}

static inline s64 abs64(s64 v)
{
	return v < 0 ? -v : v;
}

static void adjust_tsc_on_cpu(void *arg)
{
	u64 cycles = *(u64 *)arg;
	u64 adj;

	/* Runs on every CPU with interrupts off (IPI or local call). */
	rdmsrl(MSR_IA32_TSC_ADJUST, adj);
	wrmsrl(MSR_IA32_TSC_ADJUST, adj - cycles);
}

static void adjust_work_fn(struct work_struct *w)
{
	unsigned long flags;
	u64 cycles;

	spin_lock_irqsave(&fw.lock, flags);
	cycles = fw.pending_cycles;
	fw.pending_cycles = 0;
	/* While the TSC moves under the timer, it only re-bases its samples:
	 * the move itself is not a disagreement. */
	fw.adjusting = cycles != 0;
	spin_unlock_irqrestore(&fw.lock, flags);
	if (!cycles)
		return;
	on_each_cpu(adjust_tsc_on_cpu, &cycles, 1);
	spin_lock_irqsave(&fw.lock, flags);
	fw.st.adjust_writes++;
	fw.st.compensated_ns += tsc_to_ns(cycles);
	fw.adjusting = false;
	fw.have_prev = false;
	spin_unlock_irqrestore(&fw.lock, flags);
}

static enum hrtimer_restart fw_tick(struct hrtimer *t)
{
	const s64 period = (s64)period_us * NSEC_PER_USEC;
	struct sample s;
	unsigned long flags;
	int c;

	spin_lock_irqsave(&fw.lock, flags);
	take_sample(&s);
	if (fw.have_prev && !fw.adjusting) {
		s64 dmono = s.t[C_MONO] - fw.prev.t[C_MONO];

		fw.st.samples++;
		for (c = 0; c < NCLOCKS; c++) {
			s64 step;

			if (c == C_TSC && !tsc_khz)
				continue;
			step = abs64(s.t[c] - fw.prev.t[c] - period);
			if (step > fw.st.max_step[c])
				fw.st.max_step[c] = step;
			if (step > (s64)step_threshold_us * NSEC_PER_USEC)
				fw.st.steps_over[c]++;
		}
		for (c = 0; c < NDIS; c++) {
			/* D_REAL..D_TSC pair with C_REAL..C_TSC */
			s64 d = (s.t[c + 1] - fw.prev.t[c + 1]) - dmono;

			if (c == D_TSC && !tsc_khz)
				continue;
			if (abs64(d) > fw.st.max_dis[c])
				fw.st.max_dis[c] = abs64(d);
			if (abs64(d) > (s64)dis_threshold_us * NSEC_PER_USEC)
				fw.st.dis_over[c]++;
			if (c == D_TSC && d > (s64)pause_threshold_us * NSEC_PER_USEC && fw.kvm_active) {
				/* The TSC ran while kvmclock (mono) was stopped: a
				 * hypervisor pause leaked. Hide it from the TSC. */
				struct pvclock_vsyscall_time_info *pvti = pvclock_get_pvti_cpu0_va();

				fw.st.pauses++;
				fw.st.last_pause_ns = d;
				if (pvti && (READ_ONCE(pvti->pvti.flags) & PVCLOCK_GUEST_STOPPED))
					fw.st.stopped_flag++;
				if (compensate) {
					fw.pending_cycles += s.tsc - fw.prev.tsc -
						mul_u64_u32_div((u64)dmono, tsc_khz, 1000000U);
					schedule_work(&fw.adjust_work);
				}
			}
		}
	}
	fw.prev = s;
	fw.have_prev = true;
	spin_unlock_irqrestore(&fw.lock, flags);

	hrtimer_forward_now(t, ns_to_ktime(period));
	return HRTIMER_RESTART;
}

static void reset_stats_locked(void)
{
	/* compensated_ns and adjust_writes describe the TSC's state: kept. */
	s64 compensated = fw.st.compensated_ns;
	u64 writes = fw.st.adjust_writes;

	memset(&fw.st, 0, sizeof(fw.st));
	fw.st.compensated_ns = compensated;
	fw.st.adjust_writes = writes;
	fw.st.reset_mono = ktime_get_ns();
}

static void print_map(struct seq_file *m, const char *key, const char *const *names, const void *vals, int n, bool u)
{
	int i;

	seq_printf(m, ",\"%s\":{", key);
	for (i = 0; i < n; i++) {
		if (u)
			seq_printf(m, "%s\"%s\":%llu", i ? "," : "", names[i], ((const u64 *)vals)[i]);
		else
			seq_printf(m, "%s\"%s\":%lld", i ? "," : "", names[i], ((const s64 *)vals)[i]);
	}
	seq_putc(m, '}');
}

static int fw_show(struct seq_file *m, void *v)
{
	struct fw_stats snap;
	unsigned long flags;

	spin_lock_irqsave(&fw.lock, flags);
	snap = fw.st;
	spin_unlock_irqrestore(&fw.lock, flags);

	seq_printf(m, "{\"version\":1,\"period_ns\":%llu,\"tsc_khz\":%u,\"samples\":%llu,\"noisy\":%llu,\"since_reset_ns\":%lld",
		   (u64)period_us * NSEC_PER_USEC, tsc_khz, snap.samples, snap.noisy,
		   (s64)ktime_get_ns() - snap.reset_mono);
	seq_printf(m, ",\"step_threshold_ns\":%llu,\"dis_threshold_ns\":%llu",
		   (u64)step_threshold_us * NSEC_PER_USEC, (u64)dis_threshold_us * NSEC_PER_USEC);
	print_map(m, "max_step_ns", clock_names, snap.max_step, NCLOCKS, false);
	print_map(m, "steps_over", clock_names, snap.steps_over, NCLOCKS, true);
	print_map(m, "max_dis_ns", dis_names, snap.max_dis, NDIS, false);
	print_map(m, "dis_over", dis_names, snap.dis_over, NDIS, true);
	seq_printf(m, ",\"kvm\":{\"active\":%s,\"reason\":\"%s\",\"pause_threshold_ns\":%llu,\"pauses\":%llu,\"stopped_flag\":%llu,\"last_pause_ns\":%lld,\"compensated_ns\":%lld,\"adjust_writes\":%llu}}\n",
		   fw.kvm_active ? "true" : "false", fw.kvm_reason,
		   (u64)pause_threshold_us * NSEC_PER_USEC, snap.pauses, snap.stopped_flag,
		   snap.last_pause_ns, snap.compensated_ns, snap.adjust_writes);
	return 0;
}

static int fw_open(struct inode *inode, struct file *file)
{
	return single_open(file, fw_show, NULL);
}

static ssize_t fw_write(struct file *file, const char __user *buf, size_t len, loff_t *ppos)
{
	char cmd[16];
	size_t n = min(len, sizeof(cmd) - 1);
	unsigned long flags;

	if (copy_from_user(cmd, buf, n))
		return -EFAULT;
	cmd[n] = '\0';
	if (strcmp(strim(cmd), "reset") != 0)
		return -EINVAL;
	spin_lock_irqsave(&fw.lock, flags);
	reset_stats_locked();
	spin_unlock_irqrestore(&fw.lock, flags);
	return len;
}

static const struct proc_ops fw_proc_ops = {
	.proc_open = fw_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = fw_write,
};

static struct proc_dir_entry *fw_proc;

static int __init stasis_fw_init(void)
{
	if (period_us < 100 || period_us > 1000000) {
		pr_err("stasis_fw: period_us %u out of range [100, 1000000]\n", period_us);
		return -EINVAL;
	}
	spin_lock_init(&fw.lock);
	INIT_WORK(&fw.adjust_work, adjust_work_fn);
	fw.st.reset_mono = ktime_get_ns();

	/* Why the KVM path is (in)active; the checks are cheap and run once. */
	if (!kvm_para_available())
		fw.kvm_reason = "not a KVM guest (no KVM paravirt CPUID, e.g. TCG): all clocks stop with the VM";
	else if (!boot_cpu_has(X86_FEATURE_TSC_ADJUST))
		fw.kvm_reason = "KVM guest without IA32_TSC_ADJUST: pauses detected, not compensated";
	else if (!tsc_khz)
		fw.kvm_reason = "no calibrated TSC";
	else if (!compensate)
		fw.kvm_reason = "KVM guest, compensation disabled by module parameter: pauses detected only";
	else
		fw.kvm_reason = "KVM guest: pauses detected and compensated through IA32_TSC_ADJUST";
	/* Detection runs on KVM even when compensation cannot. */
	fw.kvm_active = kvm_para_available() && tsc_khz;
	if (fw.kvm_active && !boot_cpu_has(X86_FEATURE_TSC_ADJUST))
		compensate = false;

	fw_proc = proc_create("stasis_fw", 0644, NULL, &fw_proc_ops);
	if (!fw_proc)
		return -ENOMEM;

	hrtimer_init(&fw.timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_PINNED_HARD);
	fw.timer.function = fw_tick;
	hrtimer_start(&fw.timer, ns_to_ktime((u64)period_us * NSEC_PER_USEC), HRTIMER_MODE_REL_PINNED_HARD);
	pr_info("stasis_fw: sampling every %u us, tsc_khz %u; kvm: %s\n", period_us, tsc_khz, fw.kvm_reason);
	return 0;
}

static void __exit stasis_fw_exit(void)
{
	/* Timer first (it may queue the work), then the work, then /proc. */
	hrtimer_cancel(&fw.timer);
	cancel_work_sync(&fw.adjust_work);
	proc_remove(fw_proc);
}

module_init(stasis_fw_init);
module_exit(stasis_fw_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("stasis temporal firewall: kernel-precision clock step probe and KVM TSC pause concealment");
