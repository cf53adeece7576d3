<?php
// A warning and an error_log line go to FastCGI stderr (display_errors is off), not the body.
trigger_error('careful with that job', E_USER_WARNING);
error_log('written with error_log');
echo 'body after warnings';
