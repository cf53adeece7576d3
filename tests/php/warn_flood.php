<?php
// Over 2 MiB of warnings on FastCGI stderr, then a normal answer: a success all the same.
$line = str_repeat('w', 1000);
for ($i = 0; $i < 2100; $i++) {
    error_log($line);
}
echo 'done after warnings';
