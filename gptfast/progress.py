"""Progress of long work: elapsed time and an ETA as text, and on a terminal a bar redrawn in place."""
import sys
import time


def duration(seconds):
    """3725 -> '1h02m', 185 -> '3m05s', 7.2 -> '7s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Work of `total` units, `done` of them done when it starts. The ETA is the time the units done so far took
    each, times the units left."""

    def __init__(self, total, done=0, stream=None):
        self.total, self.first = total, done
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.drawn_at = 0.0
        self.tenths_reported = done * 10 // max(total, 1)
        self.on_terminal = self.stream.isatty()

    def elapsed(self):
        return time.perf_counter() - self.started

    def status(self, done):
        """'740/2000 (37%), 1m02s elapsed, ETA 1m46s'."""
        text = f"{done}/{self.total} ({100 * done // max(self.total, 1)}%), {duration(self.elapsed())} elapsed"
        if self.first < done < self.total:
            text += f", ETA {duration(self.elapsed() / (done - self.first) * (self.total - done))}"
        return text

    def draw(self, done, label):
        """On a terminal: redraw the bar, at most ten times a second. Elsewhere: nothing."""
        now = time.perf_counter()
        if not self.on_terminal or (now - self.drawn_at < 0.1 and done < self.total):
            return
        filled = 30 * done // max(self.total, 1)
        self.stream.write(f"\r\033[K{label} [{'#' * filled}{'.' * (30 - filled)}] {self.status(done)}")
        self.stream.flush()
        self.drawn_at = now

    def report(self, done, label):
        """The bar on a terminal; elsewhere (a log file, a pipe) a line at each tenth of the work."""
        if self.on_terminal:
            self.draw(done, label)
            if done == self.total:
                self.clear()
        elif done * 10 // max(self.total, 1) > self.tenths_reported:
            self.tenths_reported = done * 10 // max(self.total, 1)
            print(f"{label}: {self.status(done)}", file=self.stream, flush=True)

    def clear(self):
        """Erase the bar, so that a line printed next starts clean."""
        if self.on_terminal and self.drawn_at:
            self.stream.write("\r\033[K")
            self.stream.flush()
