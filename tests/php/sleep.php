<?php
// Sleeps for X-Sleep-Ms milliseconds (default 2000), then answers.
usleep((int)($_SERVER['HTTP_X_SLEEP_MS'] ?? 2000) * 1000);
echo 'slept';
